// SPDX-License-Identifier: Apache-2.0
// The configuration digest compared across ranks and the GPU architecture check of buffer creation.
#include "core/agreement.hpp"

#include <cstdlib>
#include <sstream>

#include "kernels/launch.hpp"

namespace epcomm::core {

ConfigDigest digestOf(const ResolvedConfig& resolved, const BufferLayout& layout) {
  const BufferConfig& c = resolved.config;
  ConfigDigest d;
  std::memset(&d, 0, sizeof(d));
  d.values[kDigestHidden] = c.hidden;
  d.values[kDigestNumExperts] = c.num_experts;
  d.values[kDigestMaxTopk] = c.max_topk;
  d.values[kDigestMaxTokens] = c.max_tokens_per_rank;
  d.values[kDigestLlMaxTokens] = c.ll_max_tokens_per_rank;
  d.values[kDigestScratchBytes] = static_cast<int64_t>(c.scratch_bytes);
  d.values[kDigestBufferBytes] = static_cast<int64_t>(layout.total_bytes);
  d.values[kDigestMemMode] = static_cast<int64_t>(c.mem_mode);
  d.values[kDigestTimeout] = static_cast<int64_t>(resolved.timeout_ns);
  d.values[kDigestFirstOpTimeout] = static_cast<int64_t>(resolved.first_op_timeout_ns);
  d.values[kDigestNumRanks] = resolved.num_ranks;
  d.from_env[kDigestMemMode] = resolved.mem_mode_from_env;
  d.from_env[kDigestTimeout] = resolved.timeout_from_env;
  d.from_env[kDigestFirstOpTimeout] = resolved.first_op_timeout_from_env;
  return d;
}

namespace {

std::string digestValue(const ConfigDigest& d, int field) {
  std::ostringstream os;
  const int64_t value = d.values[field];
  switch (field) {
    case kDigestMemMode:
      os << memModeName(static_cast<MemMode>(value));
      if (d.from_env[field]) os << " (from EPCOMM_MEM_MODE)";
      break;
    case kDigestTimeout:
      os << static_cast<double>(value) * 1e-9 << " s";
      if (d.from_env[field]) os << " (from EPCOMM_TIMEOUT_S)";
      break;
    case kDigestFirstOpTimeout:
      os << static_cast<double>(value) * 1e-9 << " s";
      if (d.from_env[field]) os << " (from EPCOMM_FIRST_OP_TIMEOUT_S)";
      break;
    default:
      os << value;
  }
  return os.str();
}

// "900,1000" (nvcc's list) as "sm_90, sm_100".
std::string archListText(const char* list) {
  std::string out;
  std::string item;
  auto flush = [&]() {
    if (item.empty()) return;
    if (!out.empty()) out += ", ";
    const int value = std::atoi(item.c_str());
    out += value > 0 ? "sm_" + std::to_string(value / 10) : item;
    item.clear();
  };
  for (const char* p = list; *p != '\0'; ++p) {
    if (*p == ',')
      flush();
    else if (*p != ' ')
      item += *p;
  }
  flush();
  return out;
}

}  // namespace

void requireSameConfig(const std::vector<ConfigDigest>& digests) {
  for (size_t r = 1; r < digests.size(); ++r) {
    for (int f = 0; f < kNumDigestFields; ++f) {
      EPCOMM_CHECK_CODE(digests[r].values[f] == digests[0].values[f], ErrorCode::kInvalidArgument,
                        "the BufferConfig differs across ranks: "
                            << kDigestFieldNames[f] << " is " << digestValue(digests[0], f)
                            << " on rank 0 but " << digestValue(digests[r], f) << " on rank " << r
                            << "; every rank must create its EpBuffer with the same configuration");
    }
  }
}

void checkArchitecture(int device) {
  const cudaError_t status = kernels::kernelImageStatus();
  if (status == cudaSuccess) return;
  if (status != cudaErrorNoKernelImageForDevice && status != cudaErrorInvalidDeviceFunction) {
    detail::throwCuda(status, "cudaFuncGetAttributes(epcomm kernel)", __FILE__, __LINE__);
  }
  cudaDeviceProp prop{};
  EPCOMM_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  EPCOMM_CHECK_CODE(false, ErrorCode::kUnsupported,
                    "GPU " << device << " (" << prop.name << ") has compute capability "
                           << prop.major << "." << prop.minor
                           << ", but epcomm's kernels were compiled for "
                           << archListText(kernels::compiledArchitectures())
                           << " only; rebuild with -DCMAKE_CUDA_ARCHITECTURES=" << prop.major
                           << prop.minor << " (or add it to the list)");
}

}  // namespace epcomm::core
