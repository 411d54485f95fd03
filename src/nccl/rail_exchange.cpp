// SPDX-License-Identifier: Apache-2.0
// The rail transport (rail_exchange.hpp): count records all-gathered over the rail and judged,
// then one grouped ncclSend/ncclRecv round for the payload; host waits bounded by the deadline.
#include "nccl/rail_exchange.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <sstream>
#include <thread>
#include <utility>

#include "check.hpp"
#include "kernels/rail_launch.hpp"

namespace epcomm::nccl {

namespace {

using Clock = std::chrono::steady_clock;
using rail::kRailRecordHeader;
using rail::RailFault;
using rail::RailVerdict;

// The test hook: node (or -1) and value, taken by the next exchange of this process.
std::atomic<int64_t> g_corrupt{-1};

size_t alignUp(size_t bytes) {
  return (bytes + 15) / 16 * 16;
}

}  // namespace

namespace testing {
void corruptNextRailCount(int node, int32_t value) {
  g_corrupt.store((static_cast<int64_t>(node) << 32) | static_cast<uint32_t>(value));
}
void takeRailCountCorruption(int32_t* node, int32_t* value) {
  const int64_t corrupt = g_corrupt.exchange(-1);
  *node = corrupt < 0 ? -1 : static_cast<int32_t>(corrupt >> 32);
  *value = static_cast<int32_t>(static_cast<uint32_t>(corrupt & 0xffffffff));
}
}  // namespace testing

RailExchange::RailExchange(RailComm& rail, double timeout_s)
    : rail_(&rail), timeout_s_(timeout_s), num_nodes_(rail.rail_size), me_(rail.rail_rank) {
  EPCOMM_CHECK(static_cast<bool>(rail.comm), "RailExchange on a rail without a communicator");
  EPCOMM_ARG_CHECK(num_nodes_ >= 1 && num_nodes_ <= rail::kMaxRailNodes, "rail nodes", num_nodes_,
                   "in [1, " << rail::kMaxRailNodes << "]");
  EPCOMM_ARG_CHECK(timeout_s > 0, "timeout_s", timeout_s, "> 0");
  const size_t record_ints = static_cast<size_t>(rail::railRecordInts(num_nodes_));
  const size_t m = static_cast<size_t>(num_nodes_);
  // Device scratch: | own record | all records | verdict | recv counts | recv offsets |
  record_off_ = 0;
  records_off_ = alignUp(record_ints * sizeof(int32_t));
  verdict_off_ = records_off_ + alignUp(m * record_ints * sizeof(int32_t));
  recv_counts_off_ = verdict_off_ + alignUp(sizeof(RailVerdict));
  recv_offsets_off_ = recv_counts_off_ + alignUp(m * sizeof(int32_t));
  scratch_ = DeviceMemory(recv_offsets_off_ + alignUp(m * sizeof(int64_t)));
  EPCOMM_CUDA_CHECK(cudaMemset(scratch_.get(), 0, scratch_.bytes()));
  // Host staging, the same layout (records for exact calls, the verdict for wait(), the receive
  // plan uploaded by exact calls).
  host_ = MappedHostMemory(scratch_.bytes());
  done_ = OwnedEvent::create();
}

std::string RailExchange::describe() const {
  std::ostringstream os;
  os << "rail " << rail_->rail << " (ranks " << rankList(rail_->rail_ranks)
     << "; this rank is its rank " << me_ << ")";
  return os.str();
}

std::vector<int> RailExchange::otherRanks() const {
  std::vector<int> others;
  for (int n = 0; n < num_nodes_; ++n) {
    if (n != me_) others.push_back(rail_->rail_ranks[n]);
  }
  return others;
}

void RailExchange::waitEvent(cudaEvent_t event, const std::vector<int>& peers,
                             const std::string& phase) {
  const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                           std::chrono::duration<double>(timeout_s_));
  auto pause = std::chrono::microseconds(5);
  for (;;) {
    const cudaError_t status = cudaEventQuery(event);
    if (status == cudaSuccess) return;
    if (status != cudaErrorNotReady) EPCOMM_CUDA_CHECK(status);
    // A network failure (a peer process gone, a socket error) shows here, not on the event.
    ncclResult_t state = ncclSuccess;
    const ncclResult_t polled = ncclCommGetAsyncError(rail_->comm.get(), &state);
    if (polled != ncclSuccess) state = polled;
    if (state != ncclSuccess && state != ncclInProgress) {
      const std::string reason = describeResult(state, rail_->comm.get());
      rail_->comm.abort();
      detail::throwError(ErrorCode::kSystem,
                         phase + " on " + describe() + " failed: " + reason +
                             ". The communicator was aborted (ncclCommAbort).",
                         __FILE__, __LINE__);
    }
    if (Clock::now() >= deadline) {
      rail_->comm.abort();
      std::ostringstream os;
      os << phase << " on " << describe() << " did not complete within " << timeout_s_ << " s";
      if (!peers.empty()) os << "; waiting for rank(s) " << rankList(peers);
      os << ". The communicator was aborted (ncclCommAbort); create a new one. Is every rank of "
            "the rail running this exchange, and can the nodes reach each other "
            "(NCCL_SOCKET_IFNAME, NCCL_DEBUG=INFO)?";
      throw TimeoutError(peers.empty() ? -1 : peers[0],
                         detail::formatMessage(os.str(), __FILE__, __LINE__));
    }
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::microseconds(1000));
  }
}

void RailExchange::throwVerdict(const RailVerdict& v, bool payload_moved) const {
  const auto rankOf = [this](int node) {
    return node >= 0 && node < num_nodes_ ? rail_->rail_ranks[node] : -1;
  };
  const RailFault fault = static_cast<RailFault>(v.fault);
  std::ostringstream os;
  os << "rail exchange on " << describe() << ": " << rail::railFaultName(fault) << ": node "
     << v.src_node << " (rank " << rankOf(v.src_node) << ") ";
  switch (fault) {
    case RailFault::kNegativeCount:
    case RailFault::kOverSlot:
      os << "sends " << v.value << " rows to node " << v.dst_node << " (rank " << rankOf(v.dst_node)
         << "); the limit is " << (fault == RailFault::kOverSlot ? "max_rows = " : "a count >= ")
         << v.limit;
      break;
    case RailFault::kOverCapacity:
      os << "sends " << v.value << " rows to node " << v.dst_node << " (rank " << rankOf(v.dst_node)
         << "), which brings the rows for it to " << v.total << ", over its receive capacity of "
         << v.limit << " rows";
      break;
    case RailFault::kBadRecord:
      os << "published a record without the magic (" << v.value << ", expected " << v.limit
         << "): not an epcomm rail exchange";
      break;
    default:
      os << "passed " << v.value << " where node 0 (rank " << rankOf(0) << ") passed " << v.limit
         << "; every rail rank must pass the same mode, row_bytes and max_rows";
      break;
  }
  os << ". "
     << (payload_moved ? "The payload moved but every received count reads 0" : "Nothing was sent")
     << "; the rail is still usable.";
  // The ranks at either end of the bad count get InvalidArgument; the rest of the rail stopped
  // because of them.
  if (me_ == v.src_node || me_ == v.dst_node) {
    detail::throwError(ErrorCode::kInvalidArgument, os.str(), __FILE__, __LINE__);
  }
  detail::throwError(ErrorCode::kRemote,
                     "rank " + std::to_string(rankOf(v.src_node)) + " failed: " + os.str(),
                     __FILE__, __LINE__);
}

void RailExchange::enqueued(const std::vector<int>& peers, const std::string& phase) {
  // A non-blocking communicator may still be connecting to the peers (NCCL connects lazily, on
  // first use): bounded like every other wait, naming them.
  waitReady(rail_->comm, timeout_s_, peers.empty() ? -1 : peers[0],
            "enqueueing " + phase + " on " + describe() +
                (peers.empty() ? std::string() : " (peer ranks " + rankList(peers) + ")"));
}

void RailExchange::launchRecordExchange(const RailExchangeArgs& a, cudaStream_t stream,
                                        const std::vector<int>& others) {
  rail::PackRecordParams pack{};
  pack.send_counts = a.send_counts;
  pack.record = scratch_.as<int32_t>(record_off_);
  pack.num_nodes = num_nodes_;
  const bool worst = a.mode == RailExchangeMode::kWorstCase;
  pack.mode = static_cast<int32_t>(worst ? rail::RailMode::kWorstCase : rail::RailMode::kExact);
  pack.row_bytes = static_cast<int32_t>(a.row_bytes);
  // Exact: a capacity above INT32_MAX rows is still an upper bound once clamped; no receive buffer
  // publishes 0, so a peer's rows for it fail the judge on every rank instead of this one alone.
  pack.capacity_rows = static_cast<int32_t>(
      worst ? a.max_rows
            : (a.recv == nullptr ? 0 : std::min<int64_t>(a.recv_capacity_rows, INT32_MAX)));
  testing::takeRailCountCorruption(&pack.corrupt_node, &pack.corrupt_value);
  rail::launchPackRailRecord(pack, stream);
  EPCOMM_NCCL_CHECK(
      ncclAllGather(scratch_.as<int32_t>(record_off_), scratch_.as<int32_t>(records_off_),
                    static_cast<size_t>(rail::railRecordInts(num_nodes_)), ncclInt32,
                    rail_->comm.get(), stream),
      rail_->comm.get());
  enqueued(others, "the count exchange");
}

RailExchangeResult RailExchange::exchange(const RailExchangeArgs& a, cudaStream_t stream) {
  EPCOMM_CHECK_CODE(
      static_cast<bool>(rail_->comm), ErrorCode::kBroken,
      "the communicator of " << describe() << " was aborted by an earlier error; create a new one");
  const bool worst = a.mode == RailExchangeMode::kWorstCase;
  EPCOMM_ARG_CHECK(a.row_bytes >= 1 && a.row_bytes <= INT32_MAX, "RailExchangeArgs::row_bytes",
                   a.row_bytes, "in [1, " << INT32_MAX << "]");
  EPCOMM_ARG_CHECK(a.send_counts != nullptr, "RailExchangeArgs::send_counts", "null",
                   "a device array of " << num_nodes_ << " int32");
  EPCOMM_ARG_CHECK(a.send != nullptr, "RailExchangeArgs::send", "null", "a device buffer");
  const int64_t m = num_nodes_;
  if (worst) {
    EPCOMM_ARG_CHECK(a.max_rows >= 1 && a.max_rows <= INT32_MAX, "RailExchangeArgs::max_rows",
                     a.max_rows, "in [1, " << INT32_MAX << "] in worst-case mode");
    EPCOMM_ARG_CHECK(a.max_rows <= INT64_MAX / m / a.row_bytes, "RailExchangeArgs::max_rows",
                     a.max_rows, "small enough that nodes * max_rows * row_bytes fits 64 bits");
    EPCOMM_ARG_CHECK(a.recv_capacity_rows >= m * a.max_rows, "RailExchangeArgs::recv_capacity_rows",
                     a.recv_capacity_rows,
                     ">= nodes * max_rows = " << m * a.max_rows << " in worst-case mode");
    EPCOMM_ARG_CHECK(a.recv != nullptr, "RailExchangeArgs::recv", "null",
                     "a device buffer in worst-case mode");
  } else {
    EPCOMM_ARG_CHECK(a.recv_capacity_rows >= 0, "RailExchangeArgs::recv_capacity_rows",
                     a.recv_capacity_rows, ">= 0");
  }
  ncclComm_t comm = rail_->comm.get();
  const std::vector<int> others = otherRanks();

  launchRecordExchange(a, stream, others);
  const auto* bytes_in = static_cast<const char*>(a.send);
  auto* bytes_out = static_cast<char*>(a.recv);

  if (worst) {
    rail::JudgeParams judge{};
    judge.records = scratch_.as<int32_t>(records_off_);
    judge.num_nodes = num_nodes_;
    judge.me = me_;
    judge.verdict = scratch_.as<RailVerdict>(verdict_off_);
    judge.recv_counts = scratch_.as<int32_t>(recv_counts_off_);
    judge.recv_offsets = scratch_.as<int64_t>(recv_offsets_off_);
    rail::launchJudgeRailRecords(judge, stream);
    // Fixed sizes: no transfer depends on what a peer published.
    const size_t slot = static_cast<size_t>(a.max_rows) * static_cast<size_t>(a.row_bytes);
    EPCOMM_NCCL_CHECK(ncclGroupStart(), comm);
    for (int n = 0; n < num_nodes_; ++n) {
      EPCOMM_NCCL_CHECK(ncclSend(bytes_in + n * slot, slot, ncclUint8, n, comm, stream), comm);
      EPCOMM_NCCL_CHECK(ncclRecv(bytes_out + n * slot, slot, ncclUint8, n, comm, stream), comm);
    }
    EPCOMM_NCCL_CHECK(ncclGroupEnd(), comm);
    enqueued(others, "the payload");
    verdict_pending_ = true;
    return {};
  }

  // Exact: the records to the host, judged there before any payload is posted.
  const size_t record_ints = static_cast<size_t>(rail::railRecordInts(num_nodes_));
  auto* records = reinterpret_cast<int32_t*>(host_.host<char>() + records_off_);
  EPCOMM_CUDA_CHECK(cudaMemcpyAsync(records, scratch_.as<int32_t>(records_off_),
                                    m * record_ints * sizeof(int32_t), cudaMemcpyDeviceToHost,
                                    stream));
  EPCOMM_CUDA_CHECK(cudaEventRecord(done_.get(), stream));
  waitEvent(done_.get(), others, "the count exchange");
  const RailVerdict verdict = rail::judgeRailRecords(records, num_nodes_);
  if (verdict.fault != 0) throwVerdict(verdict, false);

  std::vector<int64_t> send_offsets(num_nodes_);
  RailExchangeResult result;
  result.recv_counts.resize(num_nodes_);
  result.recv_offsets.resize(num_nodes_);
  result.recv_rows = rail::planRailOffsets(records, num_nodes_, me_, send_offsets.data(),
                                           result.recv_counts.data(), result.recv_offsets.data());
  // The judge bounded the sum by this rank's own capacity (the clamped value it published).
  EPCOMM_CHECK(result.recv_rows <= a.recv_capacity_rows,
               "rail exchange plan of " << result.recv_rows << " rows over the capacity "
                                        << a.recv_capacity_rows << " after a clean verdict");
  const int32_t* my_counts = rail::railRecord(records, num_nodes_, me_) + kRailRecordHeader;
  std::vector<int> pending;
  const size_t row = static_cast<size_t>(a.row_bytes);
  EPCOMM_NCCL_CHECK(ncclGroupStart(), comm);
  for (int n = 0; n < num_nodes_; ++n) {
    const size_t sends = static_cast<size_t>(my_counts[n]);
    const size_t recvs = static_cast<size_t>(result.recv_counts[n]);
    if (sends > 0) {
      EPCOMM_NCCL_CHECK(ncclSend(bytes_in + static_cast<size_t>(send_offsets[n]) * row, sends * row,
                                 ncclUint8, n, comm, stream),
                        comm);
    }
    if (recvs > 0) {
      EPCOMM_NCCL_CHECK(ncclRecv(bytes_out + static_cast<size_t>(result.recv_offsets[n]) * row,
                                 recvs * row, ncclUint8, n, comm, stream),
                        comm);
    }
    if ((sends > 0 || recvs > 0) && n != me_) pending.push_back(rail_->rail_ranks[n]);
  }
  EPCOMM_NCCL_CHECK(ncclGroupEnd(), comm);
  enqueued(pending, "the payload");

  // The receive plan on the device too, for the kernels that consume the rows.
  auto* plan_counts = reinterpret_cast<int32_t*>(host_.host<char>() + recv_counts_off_);
  auto* plan_offsets = reinterpret_cast<int64_t*>(host_.host<char>() + recv_offsets_off_);
  std::copy(result.recv_counts.begin(), result.recv_counts.end(), plan_counts);
  std::copy(result.recv_offsets.begin(), result.recv_offsets.end(), plan_offsets);
  EPCOMM_CUDA_CHECK(cudaMemcpyAsync(scratch_.as<char>(recv_counts_off_), plan_counts,
                                    recv_offsets_off_ - recv_counts_off_ + m * sizeof(int64_t),
                                    cudaMemcpyHostToDevice, stream));
  EPCOMM_CUDA_CHECK(cudaEventRecord(done_.get(), stream));
  waitEvent(done_.get(), pending, "the payload exchange");
  return result;
}

void RailExchange::wait(cudaStream_t stream) {
  EPCOMM_CHECK_CODE(
      static_cast<bool>(rail_->comm), ErrorCode::kBroken,
      "the communicator of " << describe() << " was aborted by an earlier error; create a new one");
  const std::vector<int> others = otherRanks();
  auto* verdict = reinterpret_cast<RailVerdict*>(host_.host<char>() + verdict_off_);
  EPCOMM_CUDA_CHECK(cudaMemcpyAsync(verdict, scratch_.as<RailVerdict>(verdict_off_),
                                    sizeof(RailVerdict), cudaMemcpyDeviceToHost, stream));
  // The verdict is sticky on the device (the first fault since the last wait()); clear it.
  EPCOMM_CUDA_CHECK(
      cudaMemsetAsync(scratch_.as<RailVerdict>(verdict_off_), 0, sizeof(RailVerdict), stream));
  EPCOMM_CUDA_CHECK(cudaEventRecord(done_.get(), stream));
  waitEvent(done_.get(), others, "waiting for the rail exchange");
  const RailVerdict v = *verdict;
  const bool was_pending = std::exchange(verdict_pending_, false);
  if (v.fault != 0 && was_pending) throwVerdict(v, true);
}

}  // namespace epcomm::nccl
