// SPDX-License-Identifier: Apache-2.0
// Rejected calls (see "Rejected calls" in kernels/protocol.hpp): a rank that rejects the input of
// a collective call skips it in stream order and tells every peer, so the buffer stays usable.
#include <algorithm>
#include <chrono>
#include <string>
#include <thread>

#include "check.hpp"
#include "core/buffer_core.hpp"
#include "core/control_region.hpp"

namespace epcomm {

void BufferCore::rejectInput(cudaStream_t stream, kernels::OpId op, const std::string& message) {
  const std::string outcome = skipRejectedCall(op, stream);
  throw InvalidArgument(detail::formatMessage(message + " (" +
                                                  kernels::opName(static_cast<int>(op)) +
                                                  ": nothing of it was launched; " + outcome + ")",
                                              __FILE__, __LINE__));
}

uint64_t BufferCore::callsPassed(int peer, kernels::EpochSlot family) {
  return readCallsPassed(memory->peer(peer), family, control_stream.get());
}

std::string BufferCore::skipRejectedCall(kernels::OpId op, cudaStream_t stream) {
  const kernels::EpochSlot family = kernels::epochSlotOf(op);
  if (on_call_skipped) on_call_skipped(family);  // the call is over on every rank
  if (broken) return "this EpBuffer was already unusable";
  std::string why;
  try {
    DeviceGuard guard(device);
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    EPCOMM_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    if (capture != cudaStreamCaptureStatusNone) {
      why =
          "the call was made during CUDA graph capture, where the peers cannot be told in "
          "stream order";
    } else {
      kernels::launchSkipRejected(peers, family, stream);
      trackWork(stream);
      const auto deadline =
          std::chrono::steady_clock::now() + std::chrono::duration<double>(hostDeadlineS());
      while (true) {  // the skip kernel runs after this rank's earlier work on `stream`
        const cudaError_t status = cudaStreamQuery(stream);
        if (status == cudaSuccess) break;
        if (status != cudaErrorNotReady) EPCOMM_CUDA_CHECK(status);
        checkDeviceError();
        EPCOMM_CHECK_CODE(std::chrono::steady_clock::now() < deadline, ErrorCode::kTimeout,
                          "the stream did not reach the skip of the rejected call");
        std::this_thread::sleep_for(std::chrono::microseconds(20));
      }
      // Every peer must be past the skipped call before this rank goes on, so that no rank is
      // ever two calls of a family ahead of another (the signal words hold two calls).
      const uint64_t skipped = callsPassed(rank, family);
      for (int r = 0; r < num_ranks && why.empty(); ++r) {
        while (callsPassed(r, family) < skipped) {
          if (std::chrono::steady_clock::now() > deadline) {
            why = "rank " + std::to_string(r) + " did not get to call " + std::to_string(skipped) +
                  " of this op within " + std::to_string(hostDeadlineS()) +
                  " s (every rank must make the same sequence of calls)";
            break;
          }
          std::this_thread::sleep_for(std::chrono::microseconds(50));
        }
      }
      if (why.empty()) {
        return "every peer skipped the call too and got ErrorCode::kRemote; this EpBuffer stays "
               "usable";
      }
    }
  } catch (const std::exception& e) {
    why = e.what();
  }
  broken = true;
  broken_reason = "a rejected call could not be skipped on every rank: " + why;
  return "the peers could not all be told: " + why +
         "; this EpBuffer is now unusable, destroy and recreate it on every rank";
}

}  // namespace epcomm
