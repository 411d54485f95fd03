// SPDX-License-Identifier: Apache-2.0
// Fast paths of issue 13 (docs/perf-notes.md "Fixed cost per call"). A path is on by default once
// it was measured faster and its tests passed (the defaults below); EPCOMM_PERF, read once when a
// buffer is created (so one process can measure old and new on two buffers), picks another set:
// "none" (every fast path off: the paths they replace), "all", or a comma-separated list of the
// names below (exactly those on). Every fast path speaks the same protocol on the wire as the
// path it replaces: ranks with different EPCOMM_PERF values work together. Internal.
#pragma once

namespace epcomm {

struct PerfFlags {
  // "ll_fused_dispatch": lowLatencyDispatch with both phases is one kernel (send half, then the
  // receive half in the same grid) instead of two launches. On: 2x H200, EP=2, 1 token: fixed
  // cost 26.8 -> 25.7 us, host enqueue 7.4 -> 3.9 us.
  bool ll_fused_dispatch = true;
  // "ll_fused_combine": lowLatencyCombine with both phases is one kernel (send half, then the
  // receive half) instead of two; the combine-weights push stays its own launch. On: 2x H200,
  // EP=2: fixed cost 26.9 -> 24.2 us, host enqueue 7.4 -> 3.8 us.
  bool ll_fused_combine = true;
  // "ht_counts_once": in HT dispatch (rank-major), only block 0 posts this rank's count row and
  // signature to every peer, instead of every block posting the same words. Off: measured no
  // faster (2x H200, EP=2, and 1 H200 with 1 and 2 ranks).
  bool ht_counts_once = false;
  // "ht_fused_layout": an HT dispatch with top-k (rank-major, no caller layout) runs the layout as
  // the first phase of the dispatch kernel instead of a kernel of its own (one launch fewer). Off:
  // 2x H200, EP=2, host enqueue 11.7 -> 7.1 us, but no faster on the GPU (fixed cost 22.4 ->
  // 22.9 us; 4096 tokens 208.5 -> 212.4 us, the layout's tiles then hold the dispatch's SMs).
  // For host-bound callers.
  bool ht_fused_layout = false;
  // "ht_push_combine": a copy-in HT combine (x outside the buffer's combine input, as every
  // DeepEP-style caller passes it; rank-major) pushes each token owner's rows into the owner's
  // combine input (a flag per 32-row chunk) while the owner's reducing blocks sum the tokens
  // whose rows are in, instead of staging x and letting the owners pull it
  // (kernels/intranode.cu, htPushCombineKernel). A zero-copy combine still pulls (faster there),
  // so every rank must pass x alike (all the buffer's combine input or none: the call fails on
  // every rank with a signature mismatch otherwise), and every rank must set this flag alike.
  // Its reducing blocks wait for other ranks' pushing blocks: every rank's grid must be resident
  // at once, as the default SM budgets are (BufferCore::resolveSms). On: 2x H200, EP=2, 4096
  // tokens, copy-in combine at 32/24/16 SMs pulled 237.8/270.9/365.2 us, pushed 218.6/239.1/
  // 347.0 (zero-copy 193.9/213.1/283.6; session 15, docs/perf-notes.md).
  bool ht_push_combine = true;
};

// EPCOMM_PERF, parsed (src/config.cpp, where every environment override is read). Unset, "" or
// "default": the defaults above; "none": every flag off; "all": every flag on; otherwise exactly
// the named flags on. Throws InvalidArgument naming EPCOMM_PERF on an unknown name, so a typo
// never measures the wrong path by accident.
PerfFlags perfFlagsFromEnv();

// EPCOMM_STAGE_TIMES (docs/perf-notes.md, "Stage times"), read once when a buffer is created:
// "1" makes the buffer allocate a device array of per-stage %globaltimer stamps
// (kernels/stage_times.hpp) that the default kernels fill; unset, "" or "0": off (the kernels get
// nullptr and skip every stamp). Anything else throws InvalidArgument naming EPCOMM_STAGE_TIMES.
// A diagnostic: the stamps add a barrier and an atomic per block and stage, so stage times are
// for attribution, never for the numbers of record.
bool stageTimesFromEnv();

}  // namespace epcomm
