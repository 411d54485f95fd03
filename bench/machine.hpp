// SPDX-License-Identifier: Apache-2.0
// The machine side of a run: the GPU's facts (reduced over ranks), the EpBuffers, the link limit
// measured through a buffer's peer mappings, and the setup block that describes it all.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "bench_report.hpp"
#include "epcomm/epcomm.hpp"
#include "options.hpp"
#include "ranks.hpp"

namespace epcomm::bench {

struct DeviceFacts {
  std::string name;
  int sms = 0;
  size_t l2_bytes = 0;
  size_t memory_bytes = 0;
  std::string uuid;  // hex
};

// This rank's GPU, and what the run uses of all ranks' GPUs.
struct Machine {
  int device = 0;
  DeviceFacts facts;    // this rank's GPU
  int device_sms = 0;   // min over ranks
  size_t l2_bytes = 0;  // max over ranks
  int ranks_per_gpu = 1;
  int nodes = 1;

  bool sharedGpus() const { return ranks_per_gpu > 1; }
};

// Collective: selects this rank's device and reduces its SM count and L2 size over ranks.
Machine probeMachine(const Ranks& ranks, const Bootstrap& bootstrap);

// Not collective, but every rank reaches the same verdict: what makes the options impossible on
// this machine ("" if nothing).
std::string machineProblem(const Options& o, const Ranks& ranks, const Machine& machine);

// Collective: ranks that share a GPU (allowed by epcomm for testing) make link numbers
// meaningless and NCCL refuses them; sets machine.ranks_per_gpu.
void countRanksPerGpu(const Ranks& ranks, Machine& machine);

struct BufferShape {
  int hidden = 0;
  int max_tokens = 0;
  int ll_tokens = 0;
  size_t scratch_bytes = 0;
};

struct BufferBuild {
  std::unique_ptr<EpBuffer> buffer;
  double create_ms_max = 0;
};

// Collective: creates an EpBuffer of `base` (device, experts, top-k, memory mode) with `shape`,
// and times the creation (max over ranks).
BufferBuild createBuffer(const Ranks& ranks, Bootstrap& bootstrap, const BufferConfig& base,
                         const BufferShape& shape);

// The link-limit table of docs/benchmarks.md.
struct LinkResult {
  std::vector<LinkRow> rows;
  std::optional<double> limit_gbps;  // SM store with all SMs, min over ranks
  std::string note;
};

// Collective: measures the link limit through `buffer` with all SMs and each of `sms` (nothing
// with one rank); with `bulk`, also the TMA bulk-copy rows (which never set the limit).
LinkResult measureLink(const Ranks& ranks, const Machine& machine, EpBuffer& buffer,
                       const std::vector<int>& sms, bool quick, bool bulk, cudaStream_t stream);

// Collective (gathers the GPU names): the setup block printed before the measurements.
Setup describeSetup(const Options& o, const Ranks& ranks, const Machine& machine,
                    const EpBuffer& buffer, const BufferBuild& build, const BufferShape& shape,
                    const std::string& nccl_status);

}  // namespace epcomm::bench
