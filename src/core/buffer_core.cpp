// SPDX-License-Identifier: Apache-2.0
// The buffer core: creation (configuration agreement, GPU checks, allocation, handle exchange,
// mapping, the creation barrier), teardown, host waits for the GPU and the device barrier.
// Device errors are surfaced in device_errors.cpp, rejected calls handled in rejection.cpp.
#include "core/buffer_core.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "check.hpp"
#include "core/agreement.hpp"
#include "core/control_region.hpp"
#include "core/scale_out.hpp"
#include "core/topology.hpp"
#include "log_internal.hpp"
#include "memory/nvlink_domain.hpp"

namespace epcomm {

using core::agreeOn;
using core::ConfigDigest;
using core::DeviceDigest;
using core::NoPayload;

namespace {

std::atomic<uint64_t> g_next_generation{1};

// The NVLink domain that makes this rank's node (core/topology.hpp) when its buffer may use fabric
// handles (mem_mode auto or fabric) and EPCOMM_HOSTID does not name the node; nullopt makes the
// node the host. The device is the one step 2 selects; any failure here means "no domain" and
// step 2 reports a bad device.
std::optional<std::string> nvlinkDomainOf(const BufferConfig& c) {
  if (c.mem_mode != MemMode::kAuto && c.mem_mode != MemMode::kFabric) return std::nullopt;
  if (core::hostIdOverride()) return std::nullopt;
  int device = c.device;
  if (device == kAuto && cudaGetDevice(&device) != cudaSuccess) {
    (void)cudaGetLastError();
    return std::nullopt;
  }
  std::string why;
  const std::optional<memory::NvlinkDomain> domain = memory::nvlinkDomainOf(device, &why);
  if (!domain) {
    EPCOMM_LOG_TRACE("node key: the host (" + why + ")");
    return std::nullopt;
  }
  std::string key = core::fabricDomainKeyText(domain->cluster_uuid, domain->clique_id);
  EPCOMM_LOG_TRACE("node key: NVLink domain " + key);
  return key;
}

}  // namespace

BufferCore::BufferCore(Bootstrap& bs, const BufferConfig& config) : bootstrap(bs) {
  rank = bootstrap.rank();
  num_ranks = bootstrap.size();
  detail::setProcessRank(rank);

  // 1. The configuration, checked locally and then across ranks before anything else happens,
  //    so a bad field on one rank fails every rank at once (not at the bootstrap deadline).
  core::NodeKey node_key;  // step 1b; read here so that a bad EPCOMM_HOSTID fails every rank
  const std::vector<ConfigDigest> digests =
      agreeOn<ConfigDigest>(bootstrap, "checking its BufferConfig", [&]() {
        resolved = resolveConfig(config, num_ranks);
        node_key = core::localNodeKey(nvlinkDomainOf(resolved.config));
        perf = perfFlagsFromEnv();
        stage_times_on = stageTimesFromEnv();
        layout = computeBufferLayout(resolved);
        return core::digestOf(resolved, layout);
      });
  core::requireSameConfig(digests);
  const BufferConfig& c = resolved.config;
  num_local_experts = c.num_experts / num_ranks;

  // 1b. One node, or the scale-out path (core/scale_out.hpp says how it is decided): the buffer
  //     is shared over NVLink inside one node. Ranks that span several nodes make every rank
  //     throw alike here (one all-gather, the same pure function over the same records), before
  //     anything is allocated: SeveralNodes when epcomm_nccl registered its implementation (the
  //     EpBuffer constructor then creates it), else InvalidArgument saying what to use.
  {
    const bool one_host_mode = c.mem_mode == MemMode::kPosixFd || c.mem_mode == MemMode::kCudaIpc;
    // The topology is the same on every rank, or the same InvalidArgument (uneven nodes, mixed key
    // sources). Such a job cannot be hierarchical; with a one-host memory mode it is an error, with
    // auto or fabric it goes on as one buffer, as before (e.g. an uneven multi-node NVLink domain).
    core::Topology topo;
    try {
      topo = core::discoverTopology(bootstrap, node_key);
    } catch (const InvalidArgument&) {
      if (one_host_mode) throw;
      topo.num_nodes = 1;
    }
    // Whether epcomm_nccl's implementation is registered, on every rank (only with several
    // nodes, so one node pays no extra all-gather): a mix would split the ranks between two
    // creation paths, so it fails every rank, naming a rank without.
    bool scale_out = false;
    if (topo.num_nodes > 1) {
      struct Registered {
        int32_t yes;
      };
      const std::vector<Registered> all = agreeOn<Registered>(
          bootstrap, "checking scale-out", [] { return Registered{core::hasScaleOutFactory()}; });
      bool any = false;
      int without = -1;
      for (size_t r = 0; r < all.size(); ++r) {
        any = any || all[r].yes != 0;
        if (!all[r].yes && without < 0) without = static_cast<int>(r);
      }
      if (any && without >= 0) {
        detail::throwError(ErrorCode::kInvalidArgument,
                           "EpBuffer across nodes: epcomm::nccl::enableScaleOut() was called on "
                           "some ranks but not on rank " +
                               std::to_string(without) + "; call it on every rank",
                           __FILE__, __LINE__);
      }
      scale_out = any;
    }
    const bool several =
        topo.num_nodes > 1 && (topo.source == core::NodeKeySource::kEnvHostId || one_host_mode ||
                               (scale_out && c.mem_mode == MemMode::kAuto));
    if (several && scale_out) throw core::SeveralNodes(topo.describe());
    if (several) {
      detail::throwError(
          ErrorCode::kInvalidArgument,
          "EpBuffer: the ranks span " + topo.describe() +
              "; this EpBuffer works inside one node (one NVLink domain). Across nodes, link "
              "epcomm::epcomm_nccl (built when NCCL >= 2.28 is found) and call "
              "epcomm::nccl::enableScaleOut() before creating the EpBuffer, or use "
              "epcomm::nccl::ScaleOutBuffer (include epcomm/nccl.hpp; docs/scale-out.md)",
          __FILE__, __LINE__);
    }
  }

  // 2. This rank's GPU: selectable, able to run our kernels.
  const std::vector<DeviceDigest> devices =
      agreeOn<DeviceDigest>(bootstrap, "selecting its GPU", [&]() {
        if (c.device == kAuto) {
          EPCOMM_CUDA_CHECK(cudaGetDevice(&device));
        } else {
          int count = 0;
          EPCOMM_CUDA_CHECK(cudaGetDeviceCount(&count));
          EPCOMM_ARG_CHECK(c.device < count, "BufferConfig::device", c.device,
                           "a visible device ordinal (< " << count << ")");
          device = c.device;
        }
        DeviceGuard guard(device);
        core::checkArchitecture(device);
        EPCOMM_CUDA_CHECK(
            cudaDeviceGetAttribute(&device_sms, cudaDevAttrMultiProcessorCount, device));
        DeviceDigest d;
        std::memset(&d, 0, sizeof(d));
        EPCOMM_CUDA_CHECK(cudaDeviceGetPCIBusId(d.pci_bus_id, sizeof(d.pci_bus_id) - 1, device));
        EPCOMM_CUDA_CHECK(
            cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, device));
        EPCOMM_CUDA_CHECK(
            cudaDeviceGetAttribute(&d.minor, cudaDevAttrComputeCapabilityMinor, device));
        return d;
      });
  DeviceGuard guard(device);
  dependent_launch = devices[rank].major >= 9;
  {
    const std::string mine(devices[rank].pci_bus_id, strnlen(devices[rank].pci_bus_id, 31));
    ranks_on_device = 0;
    for (int r : bootstrap.localRanks()) {
      ranks_on_device +=
          mine == std::string(devices[r].pci_bus_id, strnlen(devices[r].pci_bus_id, 31)) ? 1 : 0;
    }
    ranks_on_device = std::max(ranks_on_device, 1);
  }

  // 3. Peer access between this rank's GPU and every other GPU of this host (the kernels load
  //    and store over NVLink/PCIe P2P). A peer GPU this process cannot see is not checked here;
  //    the creation barrier below still proves the mapping.
  agreeOn<NoPayload>(bootstrap, "checking peer access", [&]() {
    const std::string mine(devices[rank].pci_bus_id, strnlen(devices[rank].pci_bus_id, 31));
    for (int r : bootstrap.localRanks()) {
      const std::string theirs(devices[r].pci_bus_id, strnlen(devices[r].pci_bus_id, 31));
      if (r == rank || theirs == mine) continue;
      int peer_device = -1;
      if (cudaDeviceGetByPCIBusId(&peer_device, theirs.c_str()) != cudaSuccess) {
        (void)cudaGetLastError();
        continue;
      }
      int can_access = 0;
      EPCOMM_CUDA_CHECK(cudaDeviceCanAccessPeer(&can_access, device, peer_device));
      EPCOMM_CHECK_CODE(can_access != 0, ErrorCode::kUnsupported,
                        "rank " << rank << " (GPU " << mine << ") cannot access the memory of rank "
                                << r << " (GPU " << theirs
                                << "): cudaDeviceCanAccessPeer reports no peer access between "
                                   "these GPUs; epcomm needs P2P (NVLink) between every pair of "
                                   "ranks' GPUs (check nvidia-smi topo -m)");
    }
    return NoPayload{};
  });

  // 4. The symmetric memory (collective; every rank takes the same path and fails together).
  const std::string forced_by =
      resolved.mem_mode_from_env ? "EPCOMM_MEM_MODE" : "BufferConfig::mem_mode";
  agreeOn<NoPayload>(bootstrap, "allocating the symmetric memory", [&]() {
    memory = memory::SymmetricMemory::create(bootstrap, device, layout.total_bytes, c.mem_mode,
                                             forced_by, c.timeout_s);
    return NoPayload{};
  });

  // 5. Local state. Signals start from zero on every rank before anyone can write to a peer
  //    (the agreement after this step is the barrier that orders the two).
  agreeOn<NoPayload>(bootstrap, "setting up its control state", [&]() {
    control_stream = OwnedStream::create();
    work_done = OwnedEvent::create();
    host_mapped = MappedHostMemory(sizeof(HostMappedState));
    peer_table = DeviceMemory(sizeof(uint8_t*) * num_ranks);
    EPCOMM_CUDA_CHECK(cudaMemcpyAsync(peer_table.get(), memory->peers().data(),
                                      sizeof(uint8_t*) * num_ranks, cudaMemcpyHostToDevice,
                                      control_stream.get()));
    clearSignals(localBase(), memory->bytes(), layout.ht, layout.ll, num_ranks,
                 control_stream.get());
    if (stage_times_on) {
      stage_times = DeviceMemory(sizeof(uint64_t) * kernels::kStageSlots);
      EPCOMM_CUDA_CHECK(
          cudaMemsetAsync(stage_times.get(), 0, stage_times.bytes(), control_stream.get()));
    }
    EPCOMM_CUDA_CHECK(cudaStreamSynchronize(control_stream.get()));
    return NoPayload{};
  });
  peers.peer_bases = peer_table.as<uint8_t* const>();
  peers.local_base = localBase();
  peers.rank = rank;
  peers.num_ranks = num_ranks;
  peers.error = &hostStateOnDevice()->error;
  peers.abort_flag = &hostStateOnDevice()->abort;
  peers.rejection_report = &hostStateOnDevice()->rejection;
  peers.timeout_ns = resolved.timeout_ns;
  peers.first_op_timeout_ns = resolved.first_op_timeout_ns;
  peers.stage_times = stage_times.as<uint64_t>();

  // 6. A device barrier proves every peer mapping works in both directions; the last agreement
  //    makes creation succeed on every rank or on none.
  agreeOn<NoPayload>(bootstrap, "the creation barrier", [&]() {
    kernels::launchBarrier(peers, control_stream.get());
    trackWork(control_stream.get());
    waitStream(control_stream.get(), "the creation barrier");
    return NoPayload{};
  });
  generation = g_next_generation.fetch_add(1);
  EPCOMM_LOG_INFO("EpBuffer ready: rank "
                  << rank << " of " << num_ranks << " on device " << device << ", memory mode "
                  << memModeName(memory->mode()) << ", " << memory->bytes()
                  << " symmetric bytes per rank (HT " << c.max_tokens_per_rank << " tokens, LL "
                  << c.ll_max_tokens_per_rank << " tokens per rank), " << device_sms
                  << " SMs, timeout " << c.timeout_s << " s");
}

BufferCore::~BufferCore() {
  // Teardown order: our work is over (bounded), no peer touches our memory any more (bootstrap
  // barrier), then the members unmap and free. Errors are logged, never thrown. Only the work of
  // this buffer is waited for (trackWork), never the whole device.
  try {
    DeviceGuard guard(device);
    if (!waitForOurWork()) {
      // A kernel of ours still runs after the abort: freeing its memory under it would turn a
      // hang into a fault. Leak it instead, deliberately.
      detail::logWarning("EpBuffer teardown: this buffer's kernels did not stop within " +
                             std::to_string(resolved.config.timeout_s) +
                             " s and an abort; its memory is leaked, not freed under them",
                         __FILE__, __LINE__);
      (void)memory.release();
      (void)new MappedHostMemory(std::move(host_mapped));
      (void)new DeviceMemory(std::move(peer_table));
      (void)new DeviceMemory(std::move(stage_times));
    }
    bootstrap.barrier();
  } catch (const std::exception& e) {
    detail::logWarning(std::string("EpBuffer teardown: ") + e.what(), __FILE__, __LINE__);
  }
}

bool BufferCore::waitForOurWork() {
  if (!work_tracked) return true;
  auto finished = [this]() {
    const cudaError_t status = cudaEventQuery(work_done.get());
    if (status == cudaErrorNotReady) return false;
    EPCOMM_CUDA_LOG(status);  // any other error: nothing more will complete
    return true;
  };
  auto waitUntil = [&](double seconds) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
    while (!finished()) {
      if (std::chrono::steady_clock::now() > deadline) return false;
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
    return true;
  };
  if (waitUntil(resolved.config.timeout_s)) return true;
  detail::logWarning("EpBuffer teardown: this buffer's work did not finish within timeout_s = " +
                         std::to_string(resolved.config.timeout_s) +
                         " s; aborting its waits (EpBuffer::abort)",
                     __FILE__, __LINE__);
  *reinterpret_cast<volatile uint32_t*>(&hostState()->abort) = 1;
  // Waits poll the abort word every few hundred microseconds; allow for a busy GPU.
  return waitUntil(5.0);
}

void BufferCore::waitStream(cudaStream_t stream, const char* what) {
  const double limit_s = hostDeadlineS();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(limit_s);
  while (true) {
    const cudaError_t status = cudaStreamQuery(stream);
    if (status == cudaSuccess) break;
    if (status != cudaErrorNotReady) EPCOMM_CUDA_CHECK(status);
    checkDeviceError();  // a peer's rejection is raised once the stream is done, below
    if (std::chrono::steady_clock::now() > deadline) {
      broken = true;
      broken_reason = std::string("the host timed out waiting for ") + what;
      throw TimeoutError(
          -1, detail::formatMessage(std::string("timed out after ") + std::to_string(limit_s) +
                                        " s waiting for " + what +
                                        " to finish on the GPU (no device-side error was recorded)",
                                    __FILE__, __LINE__));
    }
    std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
  checkUsable();
}

int BufferCore::resolveSms(cudaStream_t stream, kernels::OpId op, int call_value, int buffer_value,
                           int fallback, const char* what) {
  // The library's default is shared among the ranks on this GPU: every rank's blocks spin on
  // the others' signals, so the blocks of all of them must be resident together (a budget the
  // caller sets explicitly is taken as given).
  const int shared_default = std::max(1, std::min(fallback, device_sms / ranks_on_device));
  int sms = call_value != kAuto     ? call_value
            : buffer_value != kAuto ? buffer_value
                                    : shared_default;
  if (sms < 1 || sms > device_sms) {
    rejectInput(stream, op,
                std::string("invalid argument ") + what + " = " + std::to_string(sms) +
                    ": must be in [1, " + std::to_string(device_sms) + "] (SMs of device " +
                    std::to_string(device) + ")");
  }
  return sms;
}

void BufferCore::trackWork(cudaStream_t stream) {
  // Work captured into a CUDA graph is not tracked: an event recorded during capture marks no
  // point of a real stream.
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &capture) != cudaSuccess ||
      capture != cudaStreamCaptureStatusNone) {
    (void)cudaGetLastError();
    return;
  }
  if (cudaEventRecord(work_done.get(), stream) == cudaSuccess) {
    work_tracked = true;
  } else {
    (void)cudaGetLastError();
  }
}

double BufferCore::hostDeadlineS() const {
  // first_op_timeout_s >= timeout_s: the longest a device wait of ours can take.
  return resolved.config.first_op_timeout_s * 1.5 + 5.0;
}

void BufferCore::barrier(cudaStream_t stream) {
  checkUsable();
  DeviceGuard guard(device);
  kernels::launchBarrier(peers, stream);
  trackWork(stream);
}

}  // namespace epcomm
