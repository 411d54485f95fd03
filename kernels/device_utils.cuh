// SPDX-License-Identifier: Apache-2.0
// Device-side building blocks shared by every kernel family: system-scope release/acquire,
// tagged signal words, bounded spin-waits that record why they gave up, and vector copies.
//
// Memory-ordering rule used everywhere: many threads write data (to peers or locally),
// __syncthreads(), then ONE thread issues fence.acq_rel.sys and the release store of the signal.
// The receiver's acquire load of the signal makes all of that data visible to it, and a
// __syncthreads() after the acquire extends that to its block.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/launch.hpp"
#include "kernels/protocol.hpp"
#include "kernels/stage_times.hpp"

namespace epcomm::kernels::device {

constexpr unsigned kFullMask = 0xffffffffu;

// --- PTX primitives ------------------------------------------------------------------------------
__device__ __forceinline__ uint64_t globalTimerNs() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ uint64_t ldAcquireSys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void stReleaseSys(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// A strong store with no ordering of its own: for a tagged word that carries its own epoch and
// publishes nothing else, or after this thread's fenceAcqRelSys() (fence then strong store is a
// release pattern in the PTX memory model, so a thread that fenced once can post to R ranks
// without R more fences).
__device__ __forceinline__ void stRelaxedSys(uint64_t* p, uint64_t v) {
  asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ void fenceAcqRelSys() {
  asm volatile("fence.acq_rel.sys;" ::: "memory");
}

__device__ __forceinline__ uint32_t ldVolatileU32(const uint32_t* p) {
  return *reinterpret_cast<const volatile uint32_t*>(p);
}
__device__ __forceinline__ int32_t ldVolatileI32(const int32_t* p) {
  return *reinterpret_cast<const volatile int32_t*>(p);
}
__device__ __forceinline__ uint64_t ldVolatileU64(const uint64_t* p) {
  return *reinterpret_cast<const volatile uint64_t*>(p);
}

// Local read-only input written before this kernel (expert outputs, a token's x): a plain load,
// which the compiler may schedule freely (the volatile asm of ldNcNoAlloc keeps every load in
// program order). Measured on one H200 (a probe with the LL combine's access pattern, 24 SMs, rows
// in L2): 11.0 us plain against 15.8 us ldNcNoAlloc; equal when the rows come from HBM. In the LL
// combine's weighted sums (with ldPeer for the partials), 2x H200: 128 tokens at 24 SMs 61.8 ->
// 46.3 us, 1 token 20.6 -> 18.3 us.
__device__ __forceinline__ int4 ldInput(const int4* p) {
  return *p;
}

// Read-only input that no other agent writes during the kernel: skip L1.
__device__ __forceinline__ int4 ldNcNoAlloc(const int4* p) {
  int4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Peer-written data after this thread's acquire, or after a __syncthreads behind another thread's
// acquire of the same block: a plain (weak) load, which the PTX memory model orders after the
// acquire, and which the compiler keeps after it (the acquire's asm clobbers memory) but may
// otherwise batch and hoist. It replaced a volatile ld.global.L1::no_allocate with a memory
// clobber, which kept each load in program order behind the previous store (measured in
// docs/perf-notes.md, session 6).
__device__ __forceinline__ int4 ldPeer(const int4* p) {
  return *p;
}

// The same data through a volatile ld.global.L1::no_allocate with a memory clobber: every load in
// program order. Kept for the HT combine's pull over NVLink, where ldPeer measured 0.45 % slower
// (2x H200, 4096 tokens, 32 SMs: 201.9 -> 202.9 us).
__device__ __forceinline__ int4 ldNoAlloc(const int4* p) {
  int4 v;
  asm volatile("ld.global.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p)
               : "memory");
  return v;
}

// 16-byte vectors each lane has in flight in the row copies and the combine reductions: enough
// to hide the load latency without spilling. The HT dispatch copy keeps only the loaded vectors
// live (no accumulators), so it goes deeper.
constexpr int kUnroll = 4;
constexpr int kDispatchUnroll = 8;

// One warp copies a row of `vecs` vectors, `InFlight` loads per lane before their stores (what a
// small SM budget needs to keep its share of bandwidth: bytes in flight per SM = warps x 32 x
// InFlight x 16). `load` reads one vector (ldPeer, ldNoAlloc, or a plain load).
template <int InFlight = kUnroll, typename Vec, typename Load>
__device__ __forceinline__ void warpCopyRow(Vec* dst, const Vec* src, int vecs, int lane,
                                            Load load) {
  // The last batch is predicated, not copied one vector at a time: its loads are in flight
  // together too (a 14 KB row is 28 vectors per lane: 4 batches of 8, not 3 and 4 single ones).
  for (int v = lane; v < vecs; v += InFlight * kWarpSize) {
    Vec chunk[InFlight];
#pragma unroll
    for (int u = 0; u < InFlight; ++u) {
      if (v + u * kWarpSize < vecs) chunk[u] = load(src + v + u * kWarpSize);
    }
#pragma unroll
    for (int u = 0; u < InFlight; ++u) {
      if (v + u * kWarpSize < vecs) dst[v + u * kWarpSize] = chunk[u];
    }
  }
}

// A barrier of group `group` (0 to 3) of kThreads threads of the block (whole warps), on
// barrier 1 + group (0 is __syncthreads): a group of warps meets without stopping the block's other
// warps. Like __syncthreads, it orders the group's memory accesses before it before those after
// it. The ids are immediates: a register id makes ptxas reserve all 16 of the block's barriers.
constexpr int kMaxGroupBarriers = 4;
template <int kThreads>
__device__ __forceinline__ void groupBarrier(int group) {
  static_assert(kThreads % 32 == 0, "whole warps");
  switch (group) {
    case 0:
      asm volatile("bar.sync 1, %0;" ::"n"(kThreads) : "memory");
      break;
    case 1:
      asm volatile("bar.sync 2, %0;" ::"n"(kThreads) : "memory");
      break;
    case 2:
      asm volatile("bar.sync 3, %0;" ::"n"(kThreads) : "memory");
      break;
    default:
      asm volatile("bar.sync 4, %0;" ::"n"(kThreads) : "memory");
      break;
  }
}

__device__ __forceinline__ void stNoAlloc(int4* p, const int4& v) {
  asm volatile("st.global.L1::no_allocate.v4.s32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x),
               "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}

// LL lines (protocol.hpp, llLineFlag): 16 payload bytes as two 16-byte lines, each 8-byte half
// of a line 4 payload bytes beside the flag. Volatile vector accesses: each aligned 8-byte half
// is stored and loaded whole, which is all the protocol needs (not a whole line).
__device__ __forceinline__ void stLines(int4* lines, const int4& v, uint32_t flag) {
  asm volatile("st.volatile.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(lines), "r"(v.x),
               "r"(flag), "r"(v.y), "r"(flag));
  asm volatile("st.volatile.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(lines + 1), "r"(v.z),
               "r"(flag), "r"(v.w), "r"(flag));
}
__device__ __forceinline__ int4 ldLine(const int4* line) {
  int4 v;
  asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(line));
  return v;
}
__device__ __forceinline__ bool linesReady(const int4& a, const int4& b, uint32_t flag) {
  const int f = static_cast<int>(flag);
  return a.y == f && a.w == f && b.y == f && b.w == f;
}
__device__ __forceinline__ int4 linesPayload(const int4& a, const int4& b) {
  return make_int4(a.x, a.z, b.x, b.z);
}

// Tagged words (tag, tagEpoch, tagValue, tagReached) are in protocol.hpp.

__device__ __forceinline__ ControlRegion* controlOf(const uint8_t* base) {
  return reinterpret_cast<ControlRegion*>(const_cast<uint8_t*>(base));
}

// This launch, as 32 bits that are never 0: PTX %gridid is unique to each launch in the context.
__device__ __forceinline__ uint32_t launchId() {
  uint64_t id;
  asm volatile("mov.u64 %0, %%gridid;" : "=l"(id));
  return static_cast<uint32_t>(id % 0xffffffffu) + 1u;
}

// The epoch of the call a kernel of op family `family` runs: one past the last call that completed
// here or that a peer's rejection stopped here (see "Rejected calls" in protocol.hpp), except in
// the launch that recorded the skip: its blocks that start late still compute the skipped call,
// so that none of them works on (and writes into peers for) the next one. The skip is read from
// its one-word marker (call relative to the completed one), so no ordering between words is
// needed: two independent loads, as before the marker.
__device__ __forceinline__ uint64_t callEpoch(const ControlRegion* own, int family) {
  const uint64_t done = own->local.epoch[family];
  const uint64_t marker = own->local.skip_marker[family];
  const uint32_t ahead = static_cast<uint32_t>(marker) - static_cast<uint32_t>(done);
  if (ahead != 0 && ahead < (1u << 31)) {  // a call after the completed one was skipped
    const uint64_t skipped = done + ahead;
    return static_cast<uint32_t>(marker >> 32) == launchId() ? skipped : skipped + 1;
  }
  return done + 1;
}

// Records call `epoch` of `family` as over here because a peer skipped it (callEpoch; `skipped`
// is what the host reads).
__device__ __forceinline__ void markSkipped(ControlRegion* own, int family, uint64_t epoch) {
  *reinterpret_cast<volatile uint64_t*>(&own->local.skip_marker[family]) =
      skipMarker(launchId(), epoch);
  own->local.skipped[family] = epoch;
}

// --- failure recording ------------------------------------------------------------------------
// The first failing thread of this rank writes the host-mapped record; `kind` is written last so
// the host never reads a half-written record. Failures that make this rank's op unable to finish
// (`stops_waits`) also raise `failed`, which every wait of the rank polls and leaves on.
__device__ __forceinline__ void recordFailure(DeviceErrorRecord* record, LocalState* local,
                                              bool stops_waits, FailKind kind, OpId op,
                                              WaitPhase phase, int rank, int peer, int index,
                                              uint64_t expected, uint64_t observed) {
  if (stops_waits) atomicExch(&local->failed, 1);
  if (atomicCAS(&local->record_claimed, 0, 1) != 0) return;
  volatile DeviceErrorRecord* r = record;
  r->op = static_cast<int32_t>(op);
  r->phase = static_cast<int32_t>(phase);
  r->rank = rank;
  r->peer = peer;
  r->index = index;
  r->expected = expected;
  r->observed = observed;
  __threadfence_system();
  r->kind = static_cast<int32_t>(kind);
  __threadfence_system();
}

// A failure in a cross-rank op: stops this rank's waits.
__device__ __forceinline__ void recordOpFailure(const PeerContext& ctx, FailKind kind, OpId op,
                                                WaitPhase phase, int peer, uint64_t expected,
                                                uint64_t observed) {
  recordFailure(ctx.error, &reinterpret_cast<ControlRegion*>(ctx.local_base)->local, true, kind, op,
                phase, ctx.rank, peer, -1, expected, observed);
}

// Bad input found on this rank (an expert id out of range) or bad data received from a peer:
// records it, stops this rank's waits, and tells every peer (once per rank) through their
// peer_faulted word, so that their waits of the same op stop within microseconds with
// FailKind::kPeerFaulted naming this rank instead of running into the deadline.
// Out of line (the cold path), with scalar arguments so that no caller has to copy its
// PeerContext to the stack.
static __device__ __noinline__ void recordFaultSlow(uint8_t* const* peer_bases, uint8_t* local_base,
                                                    DeviceErrorRecord* error, int rank,
                                                    int num_ranks, uint32_t kind_op,
                                                    WaitPhase phase, int peer, int index,
                                                    uint64_t expected, uint64_t observed) {
  LocalState* local = &reinterpret_cast<ControlRegion*>(local_base)->local;
  // Already failed: recorded (and announced, if it was a fault) by whoever failed first. Also
  // keeps input with many bad ids from hammering the same words.
  if (ldVolatileI32(&local->failed) != 0) return;
  const FailKind kind = static_cast<FailKind>(faultKindOf(kind_op));
  const OpId op = static_cast<OpId>(faultOpOf(kind_op));
  recordFailure(error, local, true, kind, op, phase, rank, peer, index, expected, observed);
  if (atomicCAS(&local->fault_sent, 0, 1) != 0) return;
  // Layout in protocol.hpp (ControlRegion::peer_faulted).
  const uint64_t notice = faultNotice(rank, kind_op);
  for (int d = 0; d < num_ranks; ++d) {
    if (d != rank) stReleaseSys(&controlOf(peer_bases[d])->peer_faulted, notice);
  }
}
__device__ __forceinline__ void recordFault(const PeerContext& ctx, FailKind kind, OpId op,
                                            WaitPhase phase, int peer, int index, uint64_t expected,
                                            uint64_t observed) {
  const uint32_t kind_op = faultKindOp(kind, op);
  recordFaultSlow(ctx.peer_bases, ctx.local_base, ctx.error, ctx.rank, ctx.num_ranks, kind_op,
                  phase, peer, index, expected, observed);
}

// True when this rank already failed: kernels return before their first store to a peer.
__device__ __forceinline__ bool rankFailed(const PeerContext& ctx) {
  return ldVolatileI32(&reinterpret_cast<const ControlRegion*>(ctx.local_base)->local.failed) != 0;
}

// Per-thread context of a bounded wait.
struct WaitContext {
  const PeerContext* ctx;
  OpId op;
  uint64_t start_ns;
};

__device__ __forceinline__ uint64_t ldRelaxedSys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

// How often a spinning thread looks at the cheap device-side stop conditions, and how long it
// waits between reads of the host-mapped abort word. Reading host memory from the GPU costs a
// PCIe round trip (far more inside a VM), so it is done rarely and never in a short wait.
constexpr uint32_t kSlowCheckEvery = 32;
constexpr uint64_t kHostAbortPollNs = 200 * 1000;

// Spins until poll() returns true, then returns true. poll() makes relaxed loads (an acquire
// load on every iteration would invalidate L1 each time) and leaves in `observed` what the error
// record shows. Returns false, after recording why, when the deadline passes, the host aborts or
// `peer` skipped this call because it rejected its input (see "Rejected calls" in protocol.hpp:
// that ends the call without failing the rank); also returns false when another thread of this
// rank already failed.
// `peer`: the rank that writes what poll() reads (poll() may change it). `expected`: the call's
// epoch (every wait waits for its call's epoch); the first call of a family (epoch 1) waits up to
// first_op_timeout_ns. `tagged`: `observed` is (epoch << 32) | value and the error record shows its
// epoch part. `backoff_ns`: a sleep after every poll that finds nothing ready, for waits that many
// warps make at once (the push combine's reducers: hundreds of warps spinning on their flags slowed
// the pushes landing beside them up to 10x); 0 (every other wait) spins. The sleep doubles after
// each poll up to `max_backoff_ns` (0: it stays backoff_ns).
template <typename Poll>
__device__ __forceinline__ bool waitUntil(Poll poll, const uint64_t& observed, bool tagged,
                                          const WaitContext& w, WaitPhase phase, const int& peer,
                                          uint64_t expected, uint32_t backoff_ns = 0,
                                          uint32_t max_backoff_ns = 0) {
  const PeerContext& ctx = *w.ctx;
  ControlRegion* own = controlOf(ctx.local_base);
  const uint64_t timeout_ns = expected <= 1 ? ctx.first_op_timeout_ns : ctx.timeout_ns;
  const int family = epochSlotOf(w.op);
  uint64_t next_host_poll = w.start_ns + kHostAbortPollNs;
  uint32_t spins = 0;
  while (true) {
    if (poll()) return true;
    if (backoff_ns != 0) {
      __nanosleep(backoff_ns);
      if (backoff_ns < max_backoff_ns) backoff_ns = min(2 * backoff_ns, max_backoff_ns);
    }
    if (++spins % kSlowCheckEvery != 0) continue;
    if (ldVolatileI32(&own->local.failed) != 0) return false;
    const uint64_t faulted = ldVolatileU64(&own->peer_faulted);
    if (faulted != 0) {
      recordOpFailure(ctx, FailKind::kPeerFaulted, w.op, phase, faultNoticeRank(faulted), expected,
                      faultNoticeKindOp(faulted));
      return false;
    }
    if (peer >= 0 && peer < kMaxRanks &&
        ldVolatileU64(&own->peer_rejected[family][peer]) >= expected) {
      // The acquire orders every signal `peer` wrote before its notice (notices only grow): if
      // nothing is ready after it, `peer` skipped this call.
      (void)ldAcquireSys(&own->peer_rejected[family][peer]);
      if (poll()) return true;
      markSkipped(own, family, expected);  // the call is over here too (see callEpoch)
      *reinterpret_cast<volatile uint64_t*>(ctx.rejection_report) =
          rejectionReport(peer, w.op, expected);
      __threadfence_system();
      return false;
    }
    const uint64_t now = globalTimerNs();
    if (now >= next_host_poll) {
      next_host_poll = now + kHostAbortPollNs;
      if (ldVolatileU32(ctx.abort_flag) != 0) {
        recordOpFailure(ctx, FailKind::kAborted, w.op, phase, peer, expected,
                        tagged ? tagEpoch(observed) : observed);
        return false;
      }
    }
    if (now - w.start_ns > timeout_ns) {
      recordOpFailure(ctx, FailKind::kTimeout, w.op, phase, peer, expected,
                      tagged ? tagEpoch(observed) : observed);
      return false;
    }
  }
}

// waitUntil for one word: until ready(word) holds; returns true with the value in *value, read
// by an acquire load (it orders everything the writer released before its store). The first
// read is that acquire: a word that is ready already (a post or tag stored well before) costs
// one memory latency, not a relaxed poll and then the acquire. The polls after it are relaxed
// (an acquire on every iteration would invalidate L1 each time), then one acquire.
template <typename Ready>
__device__ __forceinline__ bool waitFor(const uint64_t* word, Ready ready, bool tagged,
                                        const WaitContext& w, WaitPhase phase, int peer,
                                        uint64_t expected, uint64_t* value = nullptr,
                                        uint32_t backoff_ns = 0, uint32_t max_backoff_ns = 0) {
  uint64_t v = ldAcquireSys(word);
  if (ready(v)) {
    if (value != nullptr) *value = v;
    return true;
  }
  const bool ok = waitUntil(
      [&] {
        v = ldRelaxedSys(word);
        return ready(v);
      },
      v, tagged, w, phase, peer, expected, backoff_ns, max_backoff_ns);
  if (!ok) return false;
  v = ldAcquireSys(word);  // monotonic: still ready, and now ordered
  if (value != nullptr) *value = v;
  return true;
}

// Waits until the epoch part of a tagged word (or a plain epoch word) reaches `epoch`.
__device__ __forceinline__ bool waitTagged(const uint64_t* word, uint64_t epoch,
                                           const WaitContext& w, WaitPhase phase, int peer,
                                           uint64_t* value = nullptr) {
  return waitFor(
      word, [epoch](uint64_t v) { return tagReached(v, epoch); }, true, w, phase, peer, epoch,
      value);
}
__device__ __forceinline__ bool waitEpoch(const uint64_t* word, uint64_t epoch,
                                          const WaitContext& w, WaitPhase phase, int peer,
                                          uint32_t backoff_ns = 0, uint32_t max_backoff_ns = 0) {
  return waitFor(
      word, [epoch](uint64_t v) { return v >= epoch; }, false, w, phase, peer, epoch, nullptr,
      backoff_ns, max_backoff_ns);
}

// --- stage times (kernels/stage_times.hpp; EPCOMM_STAGE_TIMES) ---------------------------------
// Off (ctx.stage_times == nullptr): one branch per call, nothing else.
// Out of line: inlined at every stage boundary, the stamps raised the kernels' register counts
// (HT dispatch 88 -> 99) even with the switch off; as a call on the cold path they leave them as
// they were. A reduction (no return value) in inline PTX without a memory clobber: the compiler
// need not treat it as a store that may alias the kernel's data.
static __device__ __noinline__ void stampStage(uint64_t* stamps, StageKernel kernel, int stage,
                                               uint64_t value) {
  uint64_t* slot = stamps + static_cast<int>(kernel) * kMaxStages + stage;
  asm volatile("red.relaxed.gpu.global.max.u64 [%0], %1;" ::"l"(slot), "l"(value));
}
// Thread 0 of every block, at kernel entry: the earliest entry (as ~t) and the latest.
__device__ __forceinline__ void stageStart(const PeerContext& ctx, StageKernel kernel) {
  if (ctx.stage_times != nullptr && threadIdx.x == 0) {
    const uint64_t now = globalTimerNs();
    stampStage(ctx.stage_times, kernel, kStageStart, ~now);
    stampStage(ctx.stage_times, kernel, kStageAllStarted, now);
  }
}
// The calling thread reached `stage`.
__device__ __forceinline__ void stageThread(const PeerContext& ctx, StageKernel kernel, int stage) {
  if (ctx.stage_times != nullptr) stampStage(ctx.stage_times, kernel, stage, globalTimerNs());
}
// Thread 0 of the block reached `stage`; right after a barrier, the whole block has.
__device__ __forceinline__ void stageThread0(const PeerContext& ctx, StageKernel kernel,
                                             int stage) {
  if (ctx.stage_times != nullptr && threadIdx.x == 0) {
    stampStage(ctx.stage_times, kernel, stage, globalTimerNs());
  }
}
// The whole block reached `stage`: a barrier, then thread 0. Only where every thread of the
// block gets to (the switch is the same for the whole grid, so the barrier is too).
__device__ __forceinline__ void stageBlock(const PeerContext& ctx, StageKernel kernel, int stage) {
  if (ctx.stage_times != nullptr) {
    __syncthreads();
    if (threadIdx.x == 0) stampStage(ctx.stage_times, kernel, stage, globalTimerNs());
  }
}

// --- arrival shares (ControlRegion::ht_rows_in / ht_pulls_done, arrivalShare) ----------------
// Every block, after its last access of the call that a peer must see done: thread d < R fences,
// then adds the block's share to rank d's words[me] (a fence then a relaxed reduction: a release
// pattern, cumulative over the block's accesses that the barrier ordered before it). No "last
// block": the arrival's atomic round trip and second fence, and the posts after them, are off
// the path (arriveLastBlock below).
__device__ __forceinline__ void releaseArrivalShare(uint8_t* const* peer, int num_ranks, int me,
                                                    uint64_t (ControlRegion::*words)[kMaxRanks]) {
  __syncthreads();
  const int tid = threadIdx.x;
  if (tid < num_ranks) {
    fenceAcqRelSys();
    uint64_t* word = &(controlOf(peer[tid])->*words)[me];
    asm volatile("red.relaxed.sys.global.add.u64 [%0], %1;" ::"l"(word),
                 "l"(arrivalShare(static_cast<int>(blockIdx.x), static_cast<int>(gridDim.x)))
                 : "memory");
  }
}
// One block, after its own share: thread s < R waits until every block of rank s added its share
// here (acquire), then zeroes the word. The next call's shares come only after this rank's next
// count row or "ready" post, which a later kernel makes. True in every thread when all are in.
__device__ __forceinline__ bool waitArrivalShares(const WaitContext& w,
                                                  uint64_t (ControlRegion::*words)[kMaxRanks],
                                                  WaitPhase phase, uint64_t epoch) {
  const int tid = threadIdx.x;
  bool ok = true;
  if (tid < w.ctx->num_ranks) {
    uint64_t* word = &(controlOf(w.ctx->local_base)->*words)[tid];
    ok = waitFor(
        word, [](uint64_t v) { return v >= kArrivalShares; }, false, w, phase, tid, epoch);
    if (ok) *word = 0;
  }
  return __syncthreads_and(ok);
}

// --- "last block" arrival ------------------------------------------------------------------------
// Every block calls this after its last store. Returns true in exactly one block (the last to
// arrive), whose thread 0 then issues the release stores: each arriving block's thread 0 fences at
// system scope before counting itself, and the last one fences again after seeing the count, so
// every block's stores are ordered before the signals the last block sends.
__device__ __forceinline__ bool arriveLastBlock(uint32_t* counter) {
  __shared__ bool s_last;
  __syncthreads();
  if (threadIdx.x == 0) {
    fenceAcqRelSys();
    uint32_t previous = atomicAdd(counter, 1u);
    s_last = previous == gridDim.x - 1;
    if (s_last) {
      *counter = 0;  // nobody else touches it any more in this launch
      fenceAcqRelSys();
    }
  }
  __syncthreads();
  return s_last;
}

// --- top-k rows ----------------------------------------------------------------------------------
// A token's top-k ids in registers, every load issued before any is used: a loop that uses each id
// before loading the next (or stores between the loads, which may alias) is a chain of num_topk
// memory latencies, the largest part of a small layout or LL dispatch. Entries past num_topk: -1.
// kSlots register slots: the top-k width where it is known at compile time (the layout's top-8
// instance: no run-time bound, ~2.5x fewer instructions than 16 predicated slots), else
// kMaxTopk with every loop stopping at num_topk (docs/perf-notes.md, session 18).
template <int kSlots, typename IdxT>
__device__ __forceinline__ void loadTopkRow(const IdxT* row, int num_topk, int64_t (&ids)[kSlots]) {
#pragma unroll
  for (int k = 0; k < kSlots; ++k) ids[k] = -1;
#pragma unroll
  for (int k = 0; k < kSlots; ++k) {
    if (k >= num_topk) break;
    ids[k] = static_cast<int64_t>(row[k]);
  }
}

// The routing policy (ops.hpp) on registers: entry k kept iff a valid id not equal to an earlier
// kept entry, else -1.
template <int kSlots>
__device__ __forceinline__ void dedupTopkRow(const int64_t (&ids)[kSlots], int num_topk,
                                             int num_experts, int32_t (&kept)[kSlots]) {
#pragma unroll
  for (int k = 0; k < kSlots; ++k) kept[k] = -1;
#pragma unroll
  for (int k = 0; k < kSlots; ++k) {
    if (k >= num_topk) break;
    const int32_t id = static_cast<int32_t>(ids[k]);
    bool keep = ids[k] >= 0 && ids[k] < num_experts;
#pragma unroll
    for (int j = 0; j < k; ++j) keep = keep && kept[j] != id;
    kept[k] = keep ? id : -1;
  }
}

// n / d by a multiply (an integer division is ~20 instructions): exact for n, d < 2^16, as
// expert ids and experts per rank are (kMaxExperts).
struct SmallDivisor {
  uint64_t magic;  // ceil(2^32 / d)
  __device__ __forceinline__ explicit SmallDivisor(int d)
      : magic(((uint64_t{1} << 32) + static_cast<uint64_t>(d) - 1) / static_cast<uint64_t>(d)) {}
  __device__ __forceinline__ int divide(int n) const {
    return static_cast<int>((static_cast<uint64_t>(n) * magic) >> 32);
  }
};
static_assert(kMaxExperts < (1 << 16), "SmallDivisor's exact range");

// --- destination-rank masks ----------------------------------------------------------------------
// A token's destination ranks, rankMaskWords(R) words (protocol.hpp). Held in registers: every
// access below is unrolled over the kRankMaskWords words with a compare, never indexed by a
// run-time value (that would put the mask in local memory). Words past rankMaskWords(R) are 0, so
// at R <= 32 a mask costs one load and one word of work, as the 8-rank uint32_t did.
static_assert(kMaxRanks <= kBlockThreads, "per-rank shared arrays are filled by tid < num_ranks");
struct RankMask {
  uint32_t w[kRankMaskWords];

  __device__ __forceinline__ uint32_t word(int i) const {
    uint32_t v = 0;
#pragma unroll
    for (int j = 0; j < kRankMaskWords; ++j) v = j == i ? w[j] : v;
    return v;
  }
  __device__ __forceinline__ bool test(int d) const {
    return ((word(d >> 5) >> (d & 31)) & 1u) != 0;
  }
  __device__ __forceinline__ void set(int d) {
#pragma unroll
    for (int j = 0; j < kRankMaskWords; ++j) w[j] |= j == (d >> 5) ? 1u << (d & 31) : 0u;
  }
  __device__ __forceinline__ bool any() const {
    uint32_t v = 0;
#pragma unroll
    for (int j = 0; j < kRankMaskWords; ++j) v |= w[j];
    return v != 0;
  }
};

__device__ __forceinline__ RankMask emptyRankMask() {
  RankMask m;
#pragma unroll
  for (int j = 0; j < kRankMaskWords; ++j) m.w[j] = 0;
  return m;
}

// masks: [tokens][words] with words = rankMaskWords(num_ranks).
__device__ __forceinline__ RankMask loadRankMask(const uint32_t* masks, int64_t t, int words) {
  RankMask m;
#pragma unroll
  for (int j = 0; j < kRankMaskWords; ++j) m.w[j] = j < words ? masks[t * words + j] : 0u;
  return m;
}
__device__ __forceinline__ void storeRankMask(uint32_t* masks, int64_t t, int words,
                                              const RankMask& m) {
#pragma unroll
  for (int j = 0; j < kRankMaskWords; ++j) {
    if (j < words) masks[t * words + j] = m.w[j];
  }
}

// Calls f(d) for every rank d in the mask, in increasing order.
template <typename F>
__device__ __forceinline__ void forEachRank(const RankMask& m, F&& f) {
#pragma unroll
  for (int j = 0; j < kRankMaskWords; ++j) {
    for (uint32_t bits = m.w[j]; bits != 0; bits &= bits - 1) f(j * 32 + __ffs(bits) - 1);
  }
}

// The lowest rank set in `a` but not in `b`, -1 if none (a layout's routing vs. its top-k).
__device__ __forceinline__ int firstRankOfAndNot(const RankMask& a, const RankMask& b) {
  int first = -1;
#pragma unroll
  for (int j = kRankMaskWords - 1; j >= 0; --j) {
    const uint32_t extra = a.w[j] & ~b.w[j];
    if (extra != 0) first = j * 32 + __ffs(extra) - 1;
  }
  return first;
}

// --- per-rank counts for block scans ------------------------------------------------------------
// Token counts per destination rank for a group of kRanksPerScan ranks, packed as 16-bit lanes
// (ranks 0-3 of the group in lo, 4-7 in hi) so a CUB block scan moves two words instead of eight.
// Kernels scan ceil(R / 8) groups one after another: one scan at R <= 8, as before 72 ranks.
// Callers scan at most 65535 tokens at a time, so adding packed words never carries from one lane
// into the next.
constexpr int kRanksPerScan = 8;
__host__ __device__ constexpr int rankScanGroups(int num_ranks) {
  return (num_ranks + kRanksPerScan - 1) / kRanksPerScan;
}
struct RankCounts {
  uint64_t lo;
  uint64_t hi;
  __device__ __forceinline__ uint32_t get(int d) const {
    return static_cast<uint32_t>(((d < 4 ? lo : hi) >> (16 * (d & 3))) & 0xffffu);
  }
};

struct AddRankCounts {
  __device__ __forceinline__ RankCounts operator()(const RankCounts& a, const RankCounts& b) const {
    return RankCounts{a.lo + b.lo, a.hi + b.hi};
  }
};

// One token's contribution: 1 in the lane of every rank set in the low 8 bits of `bits`.
__device__ __forceinline__ RankCounts countsOfMask(uint32_t bits) {
  RankCounts c{0, 0};
  for (uint32_t m = bits & 0xffu; m != 0; m &= m - 1) {
    const int d = __ffs(m) - 1;
    if (d < 4)
      c.lo += 1ull << (16 * d);
    else
      c.hi += 1ull << (16 * (d - 4));
  }
  return c;
}
// The same for ranks [8 * group, 8 * group + 8) of a mask (lane i = rank 8 * group + i).
__device__ __forceinline__ RankCounts countsOfGroup(const RankMask& m, int group) {
  return countsOfMask(m.word(group >> 2) >> (8 * (group & 3)));
}

// --- BF16 helpers ------------------------------------------------------------------------------
__device__ __forceinline__ void accumulateBf16x8(float (&acc)[8], const int4& v, float scale) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 f = __bfloat1622float2(h[i]);
    acc[2 * i] = fmaf(f.x, scale, acc[2 * i]);
    acc[2 * i + 1] = fmaf(f.y, scale, acc[2 * i + 1]);
  }
}

// acc += value * scale with the product rounded before the sum (no fused multiply-add), so the
// result is reproducible bit for bit by a plain float32 host loop.
__device__ __forceinline__ void accumulateBf16x8Unfused(float (&acc)[8], const int4& v,
                                                        float scale) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 f = __bfloat1622float2(h[i]);
    acc[2 * i] = __fadd_rn(acc[2 * i], __fmul_rn(f.x, scale));
    acc[2 * i + 1] = __fadd_rn(acc[2 * i + 1], __fmul_rn(f.y, scale));
  }
}

__device__ __forceinline__ int4 packBf16x8(const float (&acc)[8]) {
  int4 out;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&out);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
  return out;
}

// An HT combine's "ready" post (its combine input is in place and its region free), tag(epoch,
// signature) into every rank's ht_combine_ready[rank], from threads [0, num_ranks) of the block at
// once: each fences, then stores (a release pattern). From one thread the posts were a chain of
// a peer-table load and a store per rank, ~0.6 us each. Returns whether this thread posted.
__device__ __forceinline__ bool postCombineReady(const PeerContext& ctx, uint64_t epoch,
                                                 uint32_t signature) {
  const int d = threadIdx.x;
  if (d >= ctx.num_ranks) return false;
  fenceAcqRelSys();
  stRelaxedSys(&controlOf(ctx.peer_bases[d])->ht_combine_ready[ctx.rank], tag(epoch, signature));
  return true;
}

// One token of a combine, by one warp: out = bias + sum, over the rows r that forEachRow(f) names
// (f(r) once per row, in the order of the sum), of weight[r] * src[r], in float32 (the rows are
// ranks in the rank-major combine, top-k entries in the expert-major one). Two rows are loaded
// before either is summed, kUnroll vectors per lane each: with one row at a time the loads of a
// 24- or 16-SM grid were too few to fill NVLink (2x H200, 4096 tokens, rank-major: 246.6 -> 214.0
// us at 24 SMs, 336.4 -> 284.8 at 16, 203.2 -> 193.8 at 32). The sums keep the order, so the
// result is the one-at-a-time result bit for bit.
template <typename ForEachRow, typename Load>
__device__ __forceinline__ void sumTokenRows(int4* out, const int4* bias, const int4* const* src,
                                             const float* weight, ForEachRow forEachRow,
                                             int num_vecs, int lane, Load load) {
  for (int base = 0; base < num_vecs; base += kWarpSize * kUnroll) {
    float acc[kUnroll][8];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[u][j] = 0.f;
    }
    int pending = -1;  // a row whose loads wait for a partner
    forEachRow([&](int r) {
      if (pending < 0) {
        pending = r;
        return;
      }
      int4 a[kUnroll];
      int4 b[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = base + u * kWarpSize + lane;
        if (i < num_vecs) {
          a[u] = load(src[pending] + i);
          b[u] = load(src[r] + i);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (base + u * kWarpSize + lane < num_vecs) {
          accumulateBf16x8(acc[u], a[u], weight[pending]);
          accumulateBf16x8(acc[u], b[u], weight[r]);
        }
      }
      pending = -1;
    });
    if (pending >= 0) {
      int4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = base + u * kWarpSize + lane;
        if (i < num_vecs) v[u] = load(src[pending] + i);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (base + u * kWarpSize + lane < num_vecs) accumulateBf16x8(acc[u], v[u], weight[pending]);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * kWarpSize + lane;
      if (i < num_vecs) {
        if (bias != nullptr) accumulateBf16x8(acc[u], ldNcNoAlloc(bias + i), 1.f);
        out[i] = packBf16x8(acc[u]);
      }
    }
  }
}

}  // namespace epcomm::kernels::device
