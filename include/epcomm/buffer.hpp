// SPDX-License-Identifier: Apache-2.0
// EpBuffer: the symmetric GPU buffer one rank shares with its EP group, and the dispatch and
// combine operations that run on it.
//
// Streams: every op is stream-ordered on the stream it is given and never synchronizes the host
// (except exact_count dispatch and the explicit sync()/synchronizingBarrier()). All ops of one
// EpBuffer must be ordered with each other (one stream, or events between streams), and every
// rank must issue the same sequence of collective ops.
//
// Errors (epcomm/error.hpp says, per ErrorCode, whether the buffer is still usable):
//  - Bad input of a collective call is rejected on the host before anything is launched. The
//    call still takes its place in the sequence: the rejecting rank skips it on its stream, tells
//    every peer, waits (bounded by the deadline) until every peer is past it, and throws
//    epcomm::InvalidArgument; on the other ranks that call stops and the next call on the buffer
//    or sync() throws ErrorCode::kRemote naming the rejecting rank, once. The buffer stays usable
//    on every rank. Every rank must observe that error (sync() after the call, or a later call
//    that throws it) before it issues the next call of the same family: a call already queued
//    behind the stopped one would pair with the wrong call of a peer.
//  - A device-side wait that passes its deadline records which rank never answered; the next
//    call on the buffer (or sync()) throws epcomm::TimeoutError. Device-side faults (bad data
//    found by a kernel) stop the op on every rank. After either the buffer is unusable: destroy
//    and recreate it (on every rank).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>

#include "epcomm/bootstrap.hpp"
#include "epcomm/config.hpp"
#include "epcomm/export.hpp"
#include "epcomm/ops.hpp"

namespace epcomm {

class EpBuffer;
namespace detail {
struct BufferAccess;  // internal diagnostics (src/diagnostics.hpp); not part of the API
}  // namespace detail
namespace core {
class ScaleOutOps;  // across nodes (src/core/scale_out.hpp); not part of the API
}  // namespace core

// What one rank's symmetric buffer takes, by region (EpBuffer::bytesFor). Every field is in
// bytes and includes the alignment padding of its regions (each region starts on a 4 KiB
// boundary), so control + ht + ll + scratch + padding == total. Every rank allocates `total`.
struct BufferSizes {
  size_t total = 0;       // == EpBuffer::bytesPerRank() of a buffer with this config and rank count
  size_t control = 0;     // signal words and per-rank state (fixed, a few hundred KiB)
  size_t ht = 0;          // HT regions, 0 if max_tokens_per_rank is 0: ht_recv + ht_combine
  size_t ht_recv = 0;     //   received rows, scales, top-k ids/weights, source indices:
                          //   BufferConfig::ht_recv_rows rows (default num_ranks * max_tokens)
  size_t ht_combine = 0;  //   combine input (BF16 rows) and combine weights (float32 top-k
                          //   rows), ht_recv_rows rows each
  size_t ll = 0;          // LL regions, 0 if ll_max_tokens_per_rank is 0: the four below
  size_t ll_dispatch_staging = 0;  //   2 x num_ranks * ll_max_tokens rows (+ metadata, tags)
  size_t ll_combine_staging = 0;  //   2 x num_ranks * ll_max_tokens BF16 partials (+ weights, tags)
                                  //   and 2 x num_ranks * min(8, ll_max_tokens) partial lines
  size_t ll_outputs = 0;          //   expert-major receive views: num_local_experts *
                                  //   num_ranks * ll_max_tokens rows (+ scales, src info)
  size_t ll_bookkeeping = 0;      //   routing kept from dispatch for combine
  size_t scratch = 0;             // BufferConfig::scratch_bytes, aligned
  size_t padding = 0;             // rounding of the total up to the allocation granularity (2 MiB)
};

// Routing of one HT dispatch: what combine and a cached re-dispatch need, kept on the device.
// Create it once (EpBuffer::createHandle allocates it for the buffer's capacity) and reuse it
// every layer/step: no allocation happens per call. Combine with a handle is the backward of
// dispatch with that handle, and a cached dispatch with a handle is the backward of combine.
class EPCOMM_API EpHandle {
 public:
  EpHandle(EpHandle&&) noexcept;
  EpHandle& operator=(EpHandle&&) noexcept;
  ~EpHandle();

  int numTokens() const;  // tokens of the last layout (host value)
  int numTopk() const;

  // Layout outputs (device), valid after EpBuffer::layout or a dispatch with topk or a
  // DispatchArgs::layout (then they are the caller's layout; numTokensPerExpert() is what a
  // cached dispatch sends). Together they are a DispatchLayout for another dispatch.
  const int32_t* numTokensPerRank() const;    // [num_ranks] tokens sent to each rank
  const int32_t* numTokensPerExpert() const;  // [num_experts] (token, expert) pairs per expert
  const bool* isTokenInRank() const;          // [num_tokens, num_ranks]
  const int32_t* tokenSlot() const;           // [num_tokens, num_ranks] row among the tokens
                                              // this rank sends to that rank, -1 if not sent

  struct Impl;

 private:
  friend class EpBuffer;
  explicit EpHandle(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

class EPCOMM_API EpBuffer {
 public:
  // Collective over `bootstrap` (which must outlive the buffer): allocates this rank's share of
  // the symmetric buffer on `config.device`, exchanges handles, maps every peer and checks with
  // a device barrier that every peer is reachable. Every step is agreed by all ranks: creation
  // succeeds on every rank or throws on every rank at the same step, within the bootstrap's
  // round trip. The failing rank throws its own error; the others an error naming that rank and
  // its reason (InvalidArgument or Unsupported when the failing rank's was, else kRemote). The
  // configuration is checked and compared across ranks first (shape, capacities, memory mode,
  // deadlines; see BufferConfig), then the GPU (its architecture against the compiled ones, P2P
  // access to every other rank's GPU on this host), then the memory is allocated and mapped.
  // Across nodes (docs/scale-out.md): ranks that name several nodes (EPCOMM_HOSTID, or several
  // hosts with mem_mode posix_fd / cuda_ipc, or auto once scale-out is enabled) get the
  // hierarchical implementation of epcomm_nccl when epcomm::nccl::enableScaleOut() was called
  // (epcomm/nccl.hpp: the differences from one node are listed there), and InvalidArgument on
  // every rank otherwise. Several hosts with mem_mode fabric stay one buffer (one NVLink domain).
  EpBuffer(Bootstrap& bootstrap, const BufferConfig& config);
  // Collective: waits for this buffer's last op (the stream position recorded after it; work
  // replayed from CUDA graphs is not tracked, synchronize it first), up to timeout_s; if it has
  // not finished by then, sets the abort word (as abort() does) and waits a few more seconds,
  // and if a kernel of the buffer still runs after that, logs it and leaks the memory that kernel
  // may touch rather than free it under it. Then waits (bootstrap deadline) until no peer still
  // uses this rank's memory, unmaps the peers and frees. Never throws. Freeing with cudaFree may
  // still wait for other work on the device (a CUDA property).
  ~EpBuffer();
  EpBuffer(const EpBuffer&) = delete;
  EpBuffer& operator=(const EpBuffer&) = delete;

  int rank() const;
  int numRanks() const;
  int device() const;
  MemMode memMode() const;  // the mode actually in use (never kAuto)
  const ResolvedConfig& config() const;
  int numLocalExperts() const;
  size_t bytesPerRank() const;  // symmetric bytes this rank allocated

  // The symmetric bytes every rank of a buffer with `config` on `num_ranks` ranks allocates,
  // by region, before creating it. Computed by the code that lays the buffer out; host-only (no
  // CUDA call), not collective. Environment overrides apply as in the constructor; throws
  // InvalidArgument for a config the constructor would reject on the host.
  static BufferSizes bytesFor(const BufferConfig& config, int num_ranks);

  // --- HT -------------------------------------------------------------------------------------
  // Allocates a handle for up to max_tokens_per_rank tokens (not in a captured region). A handle
  // belongs to the buffer that created it: passing it to another buffer, or to a new buffer
  // after its own was destroyed (even one at the same address), is InvalidArgument.
  EpHandle createHandle() const;

  // Computes the routing of `topk` into `handle` (per-rank and per-expert counts,
  // is_token_in_rank, slots). Local, not collective. dispatch() with topk does this itself.
  void layout(const TopkView& topk, EpHandle& handle, cudaStream_t stream);

  // Collective. Sends each token row once to every rank that holds one of its experts (or that
  // args.layout names) and writes it at its final offset there. Graph-capturable unless
  // args.exact_count. See DispatchArgs for the routing sources and static shapes.
  DispatchResult dispatch(const DispatchArgs& args, EpHandle& handle, cudaStream_t stream);

  // Collective. Brings back one row per (token, destination rank) and sums them per token in
  // float32 (optionally scaled by CombineArgs::scale_weights, which DeepEP does not do, plus an
  // optional bias), writing BF16 in token order; every token's row is written. Optionally also
  // sums the received top-k weights back per token (CombineArgs::combined_topk_weights).
  void combine(const CombineArgs& args, const EpHandle& handle, cudaStream_t stream);

  // --- LL -------------------------------------------------------------------------------------
  // Collective. No count round trip; each call alternates with lowLatencyCombine.
  LlDispatchResult lowLatencyDispatch(const LlDispatchArgs& args, cudaStream_t stream,
                                      LlPhase phase = LlPhase::kBoth);
  void lowLatencyCombine(const LlCombineArgs& args, cudaStream_t stream,
                         LlPhase phase = LlPhase::kBoth);

  // --- Synchronization and errors ---------------------------------------------------------------
  // Collective, stream-ordered device barrier across all ranks (with the deadline).
  void barrier(cudaStream_t stream);
  // Waits for `stream` and throws the first device-side error recorded (or a peer's rejection,
  // see Errors above). The deadline covers everything queued on `stream`, the caller's own work
  // included: first_op_timeout_s * 1.5 + 5 s, above every device-side deadline so that a wait
  // that expires on the GPU reports its cause first.
  void sync(cudaStream_t stream);
  // barrier(stream) then sync(stream).
  void synchronizingBarrier(cudaStream_t stream);
  // Throws if a device-side error was recorded; cheap, never blocks.
  void checkError() const;
  // Asks every kernel of this buffer that is waiting to stop (host-mapped abort word).
  void abort();

  // --- Raw access (benchmarks, tests, custom kernels) ----------------------------------------
  // Device array [num_ranks] of every rank's buffer base as mapped in this process.
  void* const* devicePeerBases() const;
  // Host copy of the same pointers.
  void* peerBase(int rank) const;
  // Caller scratch: scratch_bytes at the same offset on every rank.
  size_t scratchOffset() const;
  size_t scratchBytes() const;

  struct Impl;

 private:
  friend struct detail::BufferAccess;
  std::unique_ptr<Impl> impl_;             // one node
  std::unique_ptr<core::ScaleOutOps> so_;  // several nodes (then impl_ is null)
};

}  // namespace epcomm
