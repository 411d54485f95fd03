// SPDX-License-Identifier: Apache-2.0
// A complete MoE layer, forward and backward, on epcomm's HT dispatch and combine, checked
// against a single-process float64 reference.
//
//   mpirun -np <ranks> ./moe_layer        (one GPU per rank, or several ranks per GPU under MPS)
//
// Forward:  recv = dispatch(x, topk)            rows go to the ranks holding the token's experts
//           rows = sum_k w_k * expert_k(recv)    on the expert rank (the router weights travel
//           along) out  = combine(rows)                 back in token order
// Backward (dLoss/d out = G is given):
//           g      = cached dispatch(G)          the backward of combine: the same routing
//           dx_row = sum_k w_k * g W_k^T, dw_row[k] = <recv W_k, g>, dW_k += w_k recv^T g
//           dx, dw = combine(dx_row, recv_topk_weights = dw_row)
//                                                the backward of dispatch; combined_topk_weights
//                                                brings the router-weight gradients home
// The forward's received rows are needed again in the backward, but the cached dispatch reuses
// the receive region: DispatchArgs::recv_x_out keeps a copy.
#include <cuda_runtime_api.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "epcomm/epcomm.hpp"
#include "epcomm/mpi_bootstrap.hpp"
#include "expert_kernels.hpp"

namespace {

constexpr int kHidden = 256;
constexpr int kExpertsPerRank = 4;
constexpr int kTopk = 4;
constexpr int kMaxTokens = 128;
constexpr uint64_t kSeed = 20261129;

#define CUDA_OK(call)                                                                 \
  do {                                                                                \
    const cudaError_t err_ = (call);                                                  \
    if (err_ != cudaSuccess)                                                          \
      throw std::runtime_error(std::string(#call) + ": " + cudaGetErrorString(err_)); \
  } while (0)

// --- Deterministic data: every rank can regenerate every rank's inputs (the reference needs
// the tokens of all ranks to check the expert-weight gradients). ---------------------------------
uint64_t mix(uint64_t v) {
  v += 0x9e3779b97f4a7c15ull;
  v = (v ^ (v >> 30)) * 0xbf58476d1ce4e5b9ull;
  v = (v ^ (v >> 27)) * 0x94d049bb133111ebull;
  return v ^ (v >> 31);
}
double uniform(uint64_t a, uint64_t b, uint64_t c, uint64_t d) {  // in [-1, 1)
  const uint64_t h = mix(mix(mix(mix(kSeed ^ a) ^ b) ^ c) ^ d);
  return static_cast<double>(h >> 11) * 0x1.0p-52 - 1.0;
}
uint16_t toBf16(float v) {  // round to nearest even (finite inputs)
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}
double fromBf16(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}

struct RankData {
  int num_tokens = 0;
  std::vector<uint16_t> x;     // [N, H] BF16
  std::vector<int64_t> topk;   // [N, K] distinct global expert ids
  std::vector<float> weights;  // [N, K] router weights
  std::vector<uint16_t> grad;  // [N, H] BF16: dLoss/d out
};

RankData makeRankData(int rank, int num_experts) {
  RankData d;
  d.num_tokens = std::min(kMaxTokens, 40 + 23 * rank);
  const int N = d.num_tokens;
  d.x.resize(size_t(N) * kHidden);
  d.grad.resize(size_t(N) * kHidden);
  for (int t = 0; t < N; ++t) {
    for (int h = 0; h < kHidden; ++h) {
      d.x[size_t(t) * kHidden + h] = toBf16(float(uniform(1, rank, t, h)));
      d.grad[size_t(t) * kHidden + h] = toBf16(float(uniform(2, rank, t, h)));
    }
    for (int k = 0; k < kTopk; ++k) {  // distinct experts: a random start and stride
      const int start = int(mix(kSeed ^ (uint64_t(rank) << 32 | t)) % num_experts);
      d.topk.push_back((start + k * 7919) % num_experts);
      d.weights.push_back(float(0.55 + 0.45 * uniform(3, rank, t, k)));
    }
    // With a stride coprime to num_experts the K ids are distinct when K <= num_experts.
  }
  return d;
}

float expertWeight(int e, int i, int j) {
  return float(uniform(4, e, i, j) / std::sqrt(double(kHidden)));
}

// --- The float64 reference
// ------------------------------------------------------------------------
struct Reference {
  std::vector<double> out, grad_x, grad_w;  // [N, H], [N, H], [N, K] of this rank
  std::vector<double> grad_weights;         // [L, H, H] of this rank's local experts
};

Reference reference(int rank, int num_ranks, int num_experts) {
  const int H = kHidden;
  Reference ref;
  ref.grad_weights.assign(size_t(kExpertsPerRank) * H * H, 0.0);
  std::vector<double> W(size_t(H) * H), y(H), back(H);
  for (int src = 0; src < num_ranks; ++src) {
    const RankData d = makeRankData(src, num_experts);
    if (src == rank) {
      ref.out.assign(size_t(d.num_tokens) * H, 0.0);
      ref.grad_x.assign(size_t(d.num_tokens) * H, 0.0);
      ref.grad_w.assign(size_t(d.num_tokens) * kTopk, 0.0);
    }
    for (int t = 0; t < d.num_tokens; ++t) {
      for (int k = 0; k < kTopk; ++k) {
        const int e = int(d.topk[size_t(t) * kTopk + k]);
        const bool local = e / kExpertsPerRank == rank;
        if (src != rank && !local) continue;
        for (int i = 0; i < H; ++i)
          for (int j = 0; j < H; ++j) W[size_t(i) * H + j] = expertWeight(e, i, j);
        const double w = d.weights[size_t(t) * kTopk + k];
        const uint16_t* x = &d.x[size_t(t) * H];
        const uint16_t* g = &d.grad[size_t(t) * H];
        double dot = 0.0;
        for (int j = 0; j < H; ++j) {
          y[j] = 0.0;
          back[j] = 0.0;
          for (int i = 0; i < H; ++i) {
            y[j] += fromBf16(x[i]) * W[size_t(i) * H + j];
            back[j] += fromBf16(g[i]) * W[size_t(j) * H + i];
          }
          dot += y[j] * fromBf16(g[j]);
        }
        if (src == rank) {
          for (int j = 0; j < H; ++j) {
            ref.out[size_t(t) * H + j] += w * y[j];
            ref.grad_x[size_t(t) * H + j] += w * back[j];
          }
          ref.grad_w[size_t(t) * kTopk + k] = dot;
        }
        if (local) {
          double* dW = &ref.grad_weights[size_t(e % kExpertsPerRank) * H * H];
          for (int i = 0; i < H; ++i)
            for (int j = 0; j < H; ++j)
              dW[size_t(i) * H + j] += w * fromBf16(x[i]) * fromBf16(g[j]);
        }
      }
    }
  }
  return ref;
}

// Largest |got - want| / (abs_tol + rel_tol * |want|); <= 1 passes.
double worstError(const std::vector<double>& got, const std::vector<double>& want, double abs_tol,
                  double rel_tol, size_t* where) {
  double worst = 0.0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double err = std::fabs(got[i] - want[i]) / (abs_tol + rel_tol * std::fabs(want[i]));
    if (!(err <= worst)) {  // NaN counts as worst
      worst = std::isnan(err) ? INFINITY : err;
      *where = i;
    }
  }
  return worst;
}

template <typename T>
T* deviceCopy(const std::vector<T>& host) {
  T* d = nullptr;
  CUDA_OK(cudaMalloc(reinterpret_cast<void**>(&d), std::max<size_t>(host.size(), 1) * sizeof(T)));
  if (!host.empty())
    CUDA_OK(cudaMemcpy(d, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}
template <typename T>
T* deviceAlloc(size_t count) {
  T* d = nullptr;
  CUDA_OK(cudaMalloc(reinterpret_cast<void**>(&d), std::max<size_t>(count, 1) * sizeof(T)));
  CUDA_OK(cudaMemset(d, 0xff, std::max<size_t>(count, 1) * sizeof(T)));  // poison
  return d;
}
template <typename T>
std::vector<T> hostCopy(const T* d, size_t count) {
  std::vector<T> h(count);
  if (count) CUDA_OK(cudaMemcpy(h.data(), d, count * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}

int run(int rank, int num_ranks) {
  const int num_experts = kExpertsPerRank * num_ranks;
  const int H = kHidden;
  const RankData data = makeRankData(rank, num_experts);
  const int N = data.num_tokens;

  epcomm::MpiBootstrap bootstrap(MPI_COMM_WORLD);
  epcomm::BufferConfig config;
  config.hidden = H;
  config.num_experts = num_experts;
  config.max_topk = kTopk;
  config.max_tokens_per_rank = kMaxTokens;
  epcomm::EpBuffer buffer(bootstrap, config);
  epcomm::EpHandle handle = buffer.createHandle();
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

  // Inputs and this rank's local expert weights.
  std::vector<float> weights(size_t(kExpertsPerRank) * H * H);
  for (int l = 0; l < kExpertsPerRank; ++l)
    for (int i = 0; i < H; ++i)
      for (int j = 0; j < H; ++j)
        weights[(size_t(l) * H + i) * H + j] = expertWeight(rank * kExpertsPerRank + l, i, j);
  uint16_t* x = deviceCopy(data.x);
  int64_t* topk = deviceCopy(data.topk);
  float* topk_w = deviceCopy(data.weights);
  uint16_t* grad_out = deviceCopy(data.grad);
  float* expert_w = deviceCopy(weights);
  const int64_t capacity = int64_t(num_ranks) * kMaxTokens;
  uint16_t* saved_x = deviceAlloc<uint16_t>(size_t(capacity) * H);
  int64_t* saved_idx = deviceAlloc<int64_t>(size_t(capacity) * kTopk);
  float* saved_w = deviceAlloc<float>(size_t(capacity) * kTopk);
  float* grad_w_rows = deviceAlloc<float>(size_t(capacity) * kTopk);
  float* grad_weights = deviceAlloc<float>(weights.size());
  CUDA_OK(cudaMemset(grad_weights, 0, weights.size() * sizeof(float)));
  uint16_t* out = deviceAlloc<uint16_t>(size_t(N) * H);
  uint16_t* grad_x = deviceAlloc<uint16_t>(size_t(N) * H);
  float* grad_topk_w = deviceAlloc<float>(size_t(N) * kTopk);

  // ---- forward ----
  epcomm::DispatchArgs d;
  d.x = x;
  d.num_tokens = N;
  d.topk = {topk, epcomm::IndexType::kInt64, N, kTopk};
  d.topk_weights = topk_w;
  d.recv_x_out = saved_x;  // the backward needs the received rows again
  const epcomm::DispatchResult recv = buffer.dispatch(d, handle, stream);
  CUDA_OK(cudaMemcpyAsync(saved_idx, recv.recv_topk_idx, capacity * kTopk * sizeof(int64_t),
                          cudaMemcpyDeviceToDevice, stream));
  CUDA_OK(cudaMemcpyAsync(saved_w, recv.recv_topk_weights, capacity * kTopk * sizeof(float),
                          cudaMemcpyDeviceToDevice, stream));
  const moe_example::ExpertRows rows{saved_x,  saved_idx, saved_w, recv.num_recv_tokens,
                                     capacity, H,         kTopk,   expert_w};
  // Expert outputs go straight into the combine input (no copy).
  moe_example::launchExpertForward(rows, static_cast<uint16_t*>(recv.combine_input), stream);
  CUDA_OK(cudaGetLastError());
  epcomm::CombineArgs c;
  c.x = recv.combine_input;
  c.out = out;  // the router weights were applied on the expert side: no scale_weights
  buffer.combine(c, handle, stream);

  // ---- backward ----
  epcomm::DispatchArgs back;  // cached: the handle's routing, no top-k sent
  back.x = grad_out;
  back.num_tokens = N;
  const epcomm::DispatchResult grad_recv = buffer.dispatch(back, handle, stream);
  moe_example::launchExpertBackward(rows, static_cast<const uint16_t*>(grad_recv.recv_x),
                                    static_cast<uint16_t*>(grad_recv.combine_input), grad_w_rows,
                                    grad_weights, stream);
  CUDA_OK(cudaGetLastError());
  epcomm::CombineArgs cb;
  cb.x = grad_recv.combine_input;
  cb.out = grad_x;
  cb.recv_topk_weights = grad_w_rows;      // dLoss/d recv_topk_weights, rows as received
  cb.combined_topk_weights = grad_topk_w;  // -> dLoss/d topk_weights [N, K]
  buffer.combine(cb, handle, stream);
  buffer.sync(stream);

  // ---- check ----
  const Reference ref = reference(rank, num_ranks, num_experts);
  auto asDouble = [](const auto& v, bool bf16) {
    std::vector<double> r(v.size());
    for (size_t i = 0; i < v.size(); ++i) r[i] = bf16 ? fromBf16(uint16_t(v[i])) : double(v[i]);
    return r;
  };
  struct Check {
    const char* name;
    std::vector<double> got;
    const std::vector<double>* want;
    double abs_tol, rel_tol;
  };
  // BF16 tolerances: inputs are exact in BF16; each expert rank rounds its row (and combine its
  // output) to BF16 once, so errors stay within a few BF16 ulps of the values summed.
  std::vector<Check> checks;
  checks.push_back({"out", asDouble(hostCopy(out, size_t(N) * H), true), &ref.out, 2e-2, 2e-2});
  checks.push_back(
      {"grad_x", asDouble(hostCopy(grad_x, size_t(N) * H), true), &ref.grad_x, 2e-2, 2e-2});
  checks.push_back({"grad_topk_weights", asDouble(hostCopy(grad_topk_w, size_t(N) * kTopk), false),
                    &ref.grad_w, 1e-3, 1e-3});
  checks.push_back({"grad_expert_weights", asDouble(hostCopy(grad_weights, weights.size()), false),
                    &ref.grad_weights, 1e-3, 1e-3});
  int failures = 0;
  for (const Check& check : checks) {
    size_t where = 0;
    const double worst = worstError(check.got, *check.want, check.abs_tol, check.rel_tol, &where);
    const bool ok = worst <= 1.0;
    failures += ok ? 0 : 1;
    std::printf("rank %d: %-20s %s (worst error %.3g of tolerance at %zu: got %.6g, want %.6g)\n",
                rank, check.name, ok ? "ok" : "MISMATCH", worst, where,
                check.got.empty() ? 0.0 : check.got[where],
                check.want->empty() ? 0.0 : (*check.want)[where]);
  }

  for (void* p :
       {static_cast<void*>(x), static_cast<void*>(topk), static_cast<void*>(topk_w),
        static_cast<void*>(grad_out), static_cast<void*>(expert_w), static_cast<void*>(saved_x),
        static_cast<void*>(saved_idx), static_cast<void*>(saved_w), static_cast<void*>(grad_w_rows),
        static_cast<void*>(grad_weights), static_cast<void*>(out), static_cast<void*>(grad_x),
        static_cast<void*>(grad_topk_w)})
    cudaFree(p);
  cudaStreamDestroy(stream);
  return failures;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, num_ranks = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &num_ranks);
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    // CTest reports this as skipped (the example needs a GPU).
    if (rank == 0) std::printf("EPCOMM_SKIPPED_NO_GPU: moe_layer needs a CUDA GPU\n");
    MPI_Finalize();
    return 0;
  }
  cudaSetDevice(rank % devices);
  int failures = 0;
  try {
    failures = run(rank, num_ranks);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rank %d: %s\n", rank, e.what());
    failures = 1;
  }
  int total = 0;
  MPI_Allreduce(&failures, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  if (rank == 0) std::printf("moe_layer: %s\n", total == 0 ? "PASSED" : "FAILED");
  MPI_Finalize();
  return total == 0 ? 0 : 1;
}
