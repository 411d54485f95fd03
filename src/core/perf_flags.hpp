// SPDX-License-Identifier: Apache-2.0
// Fast paths under measurement (issue 13, docs/perf-notes.md "Fixed cost per call"): each is off
// until measured, and turned on per process by EPCOMM_PERF, a comma-separated list of the names
// below, read once when a buffer is created (so one process can measure old and new on two
// buffers). Every fast path speaks the same protocol on the wire as the path it replaces: ranks
// with different EPCOMM_PERF values work together. Internal.
#pragma once

namespace epcomm {

struct PerfFlags {
  // "ll_fused_dispatch": lowLatencyDispatch with both phases is one kernel (send half, then the
  // receive half in the same grid) instead of two launches.
  bool ll_fused_dispatch = false;
  // "ll_fused_combine": lowLatencyCombine with both phases is one kernel (send half, then the
  // receive half) instead of two; the combine-weights push stays its own launch.
  bool ll_fused_combine = false;
  // "ll_parallel_posts": the LL kernels' last block posts to the R ranks from R threads at once
  // (R overlapping release stores) instead of from thread 0 one after the other.
  bool ll_parallel_posts = false;
  // "ht_counts_once": in HT dispatch (rank-major), only block 0 posts this rank's count row and
  // signature to every peer, instead of every block posting the same words.
  bool ht_counts_once = false;
};

// EPCOMM_PERF, parsed (src/config.cpp, where every environment override is read). "" or unset:
// every flag off; "all": every flag on. Throws InvalidArgument naming EPCOMM_PERF on an unknown
// name, so a typo never measures the old path by accident.
PerfFlags perfFlagsFromEnv();

}  // namespace epcomm
