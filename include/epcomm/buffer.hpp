// EpBuffer: the symmetric GPU buffer one rank shares with its EP group, and the dispatch and
// combine operations that run on it.
//
// Streams: every op is stream-ordered on the stream it is given and never synchronizes the host
// (except exact_count dispatch and the explicit sync()/synchronizingBarrier()). All ops of one
// EpBuffer must be ordered with each other (one stream, or events between streams), and every
// rank must issue the same sequence of collective ops.
//
// Errors: bad input throws epcomm::InvalidArgument before any kernel is launched, and the peers
// are told so that their pending ops stop with an error instead of waiting. A device-side wait
// that passes its deadline records which rank never answered; the next call on the buffer (or
// sync()) throws epcomm::TimeoutError and the buffer is then unusable: destroy and recreate it.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>

#include "epcomm/bootstrap.hpp"
#include "epcomm/config.hpp"
#include "epcomm/ops.hpp"

namespace epcomm {

class EpBuffer;

// Routing of one HT dispatch: what combine and a cached re-dispatch need, kept on the device.
// Create it once (EpBuffer::createHandle allocates it for the buffer's capacity) and reuse it
// every layer/step: no allocation happens per call. Combine with a handle is the backward of
// dispatch with that handle, and a cached dispatch with a handle is the backward of combine.
class EpHandle {
 public:
  EpHandle(EpHandle&&) noexcept;
  EpHandle& operator=(EpHandle&&) noexcept;
  ~EpHandle();

  int numTokens() const;  // tokens of the last layout (host value)
  int numTopk() const;

  // Layout outputs (device), valid after EpBuffer::layout or a dispatch with topk.
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

class EpBuffer {
 public:
  // Collective over `bootstrap` (which must outlive the buffer): allocates this rank's share of
  // the symmetric buffer on `config.device`, exchanges handles, maps every peer and checks with
  // a device barrier that every peer is reachable. Throws on every rank if any rank fails.
  EpBuffer(Bootstrap& bootstrap, const BufferConfig& config);
  // Collective: synchronizes the device, waits (with the deadline) until no peer still uses
  // this rank's memory, unmaps the peers and frees. Never throws.
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

  // --- HT -------------------------------------------------------------------------------------
  // Allocates a handle for up to max_tokens_per_rank tokens (not in a captured region).
  EpHandle createHandle() const;

  // Computes the routing of `topk` into `handle` (per-rank and per-expert counts,
  // is_token_in_rank, slots). Local, not collective. dispatch() with topk does this itself.
  void layout(const TopkView& topk, EpHandle& handle, cudaStream_t stream);

  // Collective. Sends each token row once to every rank that holds one of its experts and
  // writes it at its final offset there. Graph-capturable unless args.exact_count.
  DispatchResult dispatch(const DispatchArgs& args, EpHandle& handle, cudaStream_t stream);

  // Collective. Brings back one row per (token, destination rank) and sums them per token in
  // float32 (optionally weighted, plus an optional bias), writing BF16 in token order.
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
  // Waits for `stream` with the deadline and throws the first device-side error recorded.
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
  std::unique_ptr<Impl> impl_;
};

}  // namespace epcomm
