// SPDX-License-Identifier: Apache-2.0
// The measured cases: one HT case (every HT row at one token count and hidden size, for every
// SM budget) and one LL case (every LL row at one token count). docs/benchmarks.md, Rows, says
// what each row times.
//
// Collective discipline: every rank runs the same cases with the same arguments, so every rank
// issues the same epcomm ops, NCCL calls and MPI reductions in the same order.
#pragma once

#include <cuda_runtime_api.h>

#include <optional>
#include <vector>

#include "epcomm/buffer.hpp"
#include "nccl_baseline.hpp"
#include "ranks.hpp"
#include "results.hpp"
#include "timing.hpp"
#include "traffic.hpp"

namespace epcomm::bench {

// What every case uses from the run; the referenced objects outlive the case.
struct CaseEnv {
  const Ranks& ranks;
  const Workload& work;
  Iterations loop;
  size_t l2_bytes = 0;  // max over ranks: sizes the input-set rotation
  bool graph = true;    // CUDA-graph rows (--graph)
  cudaStream_t stream = nullptr;
  NcclBaseline& nccl;
  RowRecorder& rows;
};

struct HtCaseSpec {
  int tokens = 0;
  int hidden = 0;
  std::vector<int> sms;       // SM budgets (--sms); the first one also runs the count checks
  bool main_case = false;     // adds the 0-token round trip
  int case_id = 0;            // seeds the inputs
  bool expert_major = false;  // also the expert-major dispatch and combine rows
};

struct LlCaseSpec {
  int tokens = 0;
  int hidden = 0;
  int sms = 0;           // the LL SM budget the ops run with, printed in the SMs column
  int call_sms = kAuto;  // LlDispatchArgs / LlCombineArgs::num_sms (kAuto: the buffer's default)
  // Expert outputs for LL combine, [local experts, ranks * LL tokens, hidden] BF16.
  const DeviceMemory* expert_out = nullptr;
  int case_id = 0;
};

void runHtCase(const CaseEnv& env, EpBuffer& buffer, const HtCaseSpec& spec);
void runLlCase(const CaseEnv& env, EpBuffer& buffer, const LlCaseSpec& spec);

// --- Shared by the two case kinds -------------------------------------------------------------

// NCCL medians (max over ranks) of the all-to-all-v calls that move the case's per-peer bytes;
// empty when NCCL is not in use. The round trip is measured only with graph rows.
struct NcclTimes {
  std::optional<double> bf16;        // dispatch, BF16 rows
  std::optional<double> fp8;         // dispatch, FP8 rows with their scales
  std::optional<double> combine;     // BF16 rows back
  std::optional<double> round_trip;  // dispatch then combine
};

// Collective: builds the exchanges of every input set (in set order) and times them in the
// order bf16, fp8, combine, round trip.
NcclTimes timeNcclBaselines(const CaseEnv& env, const std::vector<const Traffic*>& sets,
                            int hidden);

}  // namespace epcomm::bench
