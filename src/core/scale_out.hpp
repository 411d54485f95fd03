// SPDX-License-Identifier: Apache-2.0
// EpBuffer across nodes (docs/scale-out.md): what EpBuffer delegates to when its ranks span
// several nodes. The core stays NCCL-free: it only declares this interface and keeps the one
// factory that epcomm_nccl registers (epcomm::nccl::enableScaleOut(), include/epcomm/nccl.hpp).
// Internal; exported (EPCOMM_API) only because epcomm_nccl uses it.
//
// How EpBuffer decides (creation step 1b, src/core/buffer_core.cpp): after the config is agreed,
// every rank discovers the topology (one all-gather, the same pure function everywhere). Several
// nodes when the ranks name several EPCOMM_HOSTIDs, or several hosts with a one-host memory mode
// (posix_fd, cuda_ipc), or several hosts with mem_mode auto while a factory is registered. Then
// BufferCore throws SeveralNodes (on every rank alike, before allocating anything) and EpBuffer
// creates the registered implementation instead; without one, every rank throws InvalidArgument
// saying to link epcomm_nccl. Several hosts with mem_mode fabric stay one buffer: a multi-node
// NVLink domain spans hosts.
#pragma once

#include <cuda_runtime_api.h>

#include <functional>
#include <memory>
#include <stdexcept>
#include <string>

#include "core/topology.hpp"
#include "epcomm/bootstrap.hpp"
#include "epcomm/config.hpp"
#include "epcomm/export.hpp"
#include "epcomm/ops.hpp"

namespace epcomm {
class EpBuffer;
}

namespace epcomm::core {

// The hierarchical implementation behind an EpBuffer whose ranks span several nodes. Same
// semantics as the EpBuffer methods of the same names, with the differences documented for
// epcomm::nccl::ScaleOutBuffer.
class ScaleOutOps {
 public:
  virtual ~ScaleOutOps() = default;
  virtual int rank() const = 0;
  virtual int numRanks() const = 0;
  virtual int numLocalExperts() const = 0;
  virtual const ResolvedConfig& config() const = 0;  // the job's (not the node buffer's)
  virtual EpBuffer& nodeBuffer() = 0;                // the node-local buffer (NVLink leg)
  // A handle's state, owned by the EpHandle (EpHandle::Impl::scale_out).
  virtual std::shared_ptr<void> createHandle() const = 0;
  virtual void layout(const TopkView& topk, void* handle, cudaStream_t stream) = 0;
  virtual DispatchResult dispatch(const DispatchArgs& args, void* handle, cudaStream_t stream) = 0;
  virtual void combine(const CombineArgs& args, const void* handle, cudaStream_t stream) = 0;
  virtual LlDispatchResult lowLatencyDispatch(const LlDispatchArgs& args, cudaStream_t stream,
                                              LlPhase phase) = 0;
  virtual void lowLatencyCombine(const LlCombineArgs& args, cudaStream_t stream, LlPhase phase) = 0;
  virtual void barrier(cudaStream_t stream) = 0;
  virtual void sync(cudaStream_t stream) = 0;
};

// Collective over `bootstrap`, like the EpBuffer constructor it serves.
using ScaleOutFactory =
    std::function<std::unique_ptr<ScaleOutOps>(Bootstrap& bootstrap, const BufferConfig& config)>;

// Registers (or, with an empty function, removes) the implementation; process-wide.
EPCOMM_API void setScaleOutFactory(ScaleOutFactory factory);
EPCOMM_API bool hasScaleOutFactory();

// Thrown by BufferCore's creation on every rank alike when the ranks span several nodes and a
// factory is registered; EpBuffer catches it and calls createScaleOut. Never leaves EpBuffer.
struct SeveralNodes : std::runtime_error {
  explicit SeveralNodes(const std::string& what) : std::runtime_error(what) {}
};

// Collective: the registered implementation for `config` on `bootstrap`.
EPCOMM_API std::unique_ptr<ScaleOutOps> createScaleOut(Bootstrap& bootstrap,
                                                       const BufferConfig& config);

}  // namespace epcomm::core
