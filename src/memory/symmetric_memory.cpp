#include "memory/symmetric_memory.hpp"

#include <unistd.h>

#include <cstring>
#include <sstream>

#include "check.hpp"
#include "cuda_resources.hpp"
#include "memory/driver_api.hpp"
#include "memory/fd_exchange.hpp"
#include "memory/peer_info.hpp"

namespace epcomm::memory {

// --- owners of one mapping ---------------------------------------------------------------------

struct SymmetricMemory::Mapping {
  virtual ~Mapping() = default;
  void* ptr = nullptr;
};

namespace {

// A VMM allocation (created here or imported): physical handle + VA reservation + mapping,
// released in reverse order.
struct VmmMapping : SymmetricMemory::Mapping {
  CUmemGenericAllocationHandle handle = 0;
  bool has_handle = false;
  CUdeviceptr va = 0;
  size_t size = 0;
  bool mapped = false;

  ~VmmMapping() override {
    const DriverApi* api = DriverApi::tryGet();
    if (api == nullptr) return;
    auto log = [](CUresult status, const char* what) {
      if (status != CUDA_SUCCESS) {
        detail::logWarning(std::string(what) + " failed: " + driverErrorName(status), __FILE__,
                           __LINE__);
      }
    };
    if (mapped) log(api->memUnmap(va, size), "cuMemUnmap");
    if (va != 0) log(api->memAddressFree(va, size), "cuMemAddressFree");
    if (has_handle) log(api->memRelease(handle), "cuMemRelease");
  }

  // Reserves VA, maps the handle and grants this process's device read/write access.
  void mapForDevice(const DriverApi& api, int device, size_t granularity) {
    EPCOMM_CU_CHECK(api.memAddressReserve(&va, size, granularity, 0, 0));
    EPCOMM_CU_CHECK(api.memMap(va, size, 0, handle, 0));
    mapped = true;
    CUmemAccessDesc access{};
    access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    access.location.id = device;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    EPCOMM_CU_CHECK(api.memSetAccess(va, size, &access, 1));
    ptr = reinterpret_cast<void*>(va);
  }
};

struct CudaMallocMapping : SymmetricMemory::Mapping {
  ~CudaMallocMapping() override {
    if (ptr != nullptr) EPCOMM_CUDA_LOG(cudaFree(ptr));
  }
};

struct IpcImportMapping : SymmetricMemory::Mapping {
  ~IpcImportMapping() override {
    if (ptr != nullptr) EPCOMM_CUDA_LOG(cudaIpcCloseMemHandle(ptr));
  }
};

CUmemAllocationProp vmmProperties(int device, CUmemAllocationHandleType type) {
  CUmemAllocationProp prop{};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = device;
  prop.requestedHandleTypes = type;
  return prop;
}

size_t granularityOf(const DriverApi& api, const CUmemAllocationProp& prop) {
  size_t granularity = 0;
  EPCOMM_CU_CHECK(api.memGetAllocationGranularity(&granularity, &prop,
                                                  CU_MEM_ALLOC_GRANULARITY_RECOMMENDED));
  return granularity;
}

size_t roundUp(size_t v, size_t to) { return (v + to - 1) / to * to; }

std::string describe(const std::exception& e) { return e.what(); }

// Reads a device attribute, treating a failed query as an error (never as "0 = unsupported").
int deviceAttribute(const DriverApi& api, CUdevice_attribute attribute, int device,
                    const char* name) {
  CUdevice dev = 0;
  EPCOMM_CU_CHECK(api.deviceGet(&dev, device));
  int value = 0;
  CUresult status = api.deviceGetAttribute(&value, attribute, dev);
  if (status != CUDA_SUCCESS) {
    detail::throwDriver(static_cast<int>(status), name, __FILE__, __LINE__);
  }
  return value;
}

// Local check of the fabric path: really create, export, import back, map and release a small
// allocation. The attribute alone over-reports (it reads 1 without an IMEX channel).
bool probeFabric(int device, std::string* why) {
  try {
    const DriverApi& api = DriverApi::get();
    if (deviceAttribute(api, CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_FABRIC_SUPPORTED, device,
                        "cuDeviceGetAttribute(HANDLE_TYPE_FABRIC_SUPPORTED)") == 0) {
      *why = "the device reports no fabric handle support";
      return false;
    }
    const CUmemAllocationProp prop = vmmProperties(device, CU_MEM_HANDLE_TYPE_FABRIC);
    VmmMapping probe;
    probe.size = granularityOf(api, prop);
    CUresult status = api.memCreate(&probe.handle, probe.size, &prop, 0);
    if (status != CUDA_SUCCESS) {
      *why = "cuMemCreate(CU_MEM_HANDLE_TYPE_FABRIC) failed with " + driverErrorName(status) +
             " (no usable IMEX channel: /dev/nvidia-caps-imex-channels)";
      return false;
    }
    probe.has_handle = true;
    CUmemFabricHandle fabric{};
    status = api.memExportToShareableHandle(&fabric, probe.handle, CU_MEM_HANDLE_TYPE_FABRIC, 0);
    if (status != CUDA_SUCCESS) {
      *why = "cuMemExportToShareableHandle(FABRIC) failed with " + driverErrorName(status);
      return false;
    }
    VmmMapping imported;
    imported.size = probe.size;
    status = api.memImportFromShareableHandle(&imported.handle, &fabric, CU_MEM_HANDLE_TYPE_FABRIC);
    if (status != CUDA_SUCCESS) {
      *why = "cuMemImportFromShareableHandle(FABRIC) failed with " + driverErrorName(status);
      return false;
    }
    imported.has_handle = true;
    imported.mapForDevice(api, device, probe.size);
    return true;
  } catch (const std::exception& e) {
    *why = describe(e);
    return false;
  }
}

bool probePosixFd(int device, std::string* why) {
  try {
    const DriverApi& api = DriverApi::get();
    if (deviceAttribute(api, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, device,
                        "cuDeviceGetAttribute(VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED)") == 0) {
      *why = "the device does not support virtual memory management";
      return false;
    }
    if (deviceAttribute(api, CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED,
                        device,
                        "cuDeviceGetAttribute(HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED)") == 0) {
      *why = "the device does not support POSIX fd handles";
      return false;
    }
    return true;
  } catch (const std::exception& e) {
    *why = describe(e);
    return false;
  }
}

// All-gathers (ok, reason) and returns the first failing rank's reason, or "" if all are ok.
std::string agreeOnFailure(Bootstrap& bootstrap, bool ok, const std::string& why) {
  PeerInfo mine;
  mine.rank = bootstrap.rank();
  mine.ok = ok;
  mine.error = why;
  const std::vector<uint8_t> wire = serializePeerInfo(mine);
  std::vector<uint8_t> all(wire.size() * static_cast<size_t>(bootstrap.size()));
  bootstrap.allGather(wire.data(), all.data(), wire.size());
  for (int r = 0; r < bootstrap.size(); ++r) {
    PeerInfo info = deserializePeerInfo(all.data() + r * wire.size(), wire.size());
    if (!info.ok) return "rank " + std::to_string(r) + ": " + info.error;
  }
  return "";
}

}  // namespace

// --- SymmetricMemory ---------------------------------------------------------------------------

SymmetricMemory::SymmetricMemory(Bootstrap& bootstrap, int device)
    : bootstrap_(bootstrap), device_(device), rank_(bootstrap.rank()) {}

std::unique_ptr<SymmetricMemory> SymmetricMemory::create(Bootstrap& bootstrap, int device,
                                                         size_t bytes, MemMode requested,
                                                         const std::string& forced_by,
                                                         double timeout_s) {
  DeviceGuard guard(device);
  std::unique_ptr<SymmetricMemory> memory(new SymmetricMemory(bootstrap, device));
  const bool forced = requested != MemMode::kAuto;
  std::vector<MemMode> candidates;
  if (forced) {
    candidates = {requested};
  } else {
    candidates = {MemMode::kFabric, MemMode::kPosixFd, MemMode::kCudaIpc};
  }

  std::ostringstream log;
  std::string last_failure;
  for (MemMode mode : candidates) {
    // Every rank must take the same path: AND the local probes over all ranks.
    bool ok = true;
    std::string why;
    if (mode == MemMode::kFabric) {
      ok = probeFabric(device, &why);
    } else if (mode == MemMode::kPosixFd) {
      ok = probePosixFd(device, &why);
    }
    if (ok && mode != MemMode::kFabric && bootstrap.numNodes() > 1) {
      ok = false;
      why = "the ranks span " + std::to_string(bootstrap.numNodes()) +
            " hosts; only fabric handles cross hosts";
    }
    std::string failure = agreeOnFailure(bootstrap, ok, why);
    EPCOMM_LOG_TRACE("memory mode " << memModeName(mode) << " probe: "
                                    << (failure.empty() ? "usable on every rank" : failure));
    if (failure.empty() && memory->tryMode(mode, bytes, timeout_s, &failure)) {
      log << memModeName(mode) << ": selected";
      memory->selection_log_ = log.str();
      EPCOMM_LOG_INFO("memory mode " << memModeName(mode)
                                     << (forced ? " (forced by " + forced_by + ")" : "") << ": "
                                     << memory->selection_log_ << "; " << memory->bytes()
                                     << " symmetric bytes per rank on device " << device);
      return memory;
    }
    log << memModeName(mode) << ": unusable (" << failure << "); ";
    last_failure = failure;
    if (forced) {
      EPCOMM_CHECK_CODE(false, ErrorCode::kUnsupported,
                        "memory mode '" << memModeName(mode) << "' was forced by " << forced_by
                                        << " but cannot be used: " << failure
                                        << ". Use mem_mode auto, or fix the cause above.");
    }
  }
  EPCOMM_CHECK_CODE(false, ErrorCode::kUnsupported,
                    "no memory sharing mode works on this machine: " << log.str());
  return nullptr;
}

bool SymmetricMemory::tryMode(MemMode mode, size_t bytes, double timeout_s, std::string* why) {
  const int num_ranks = bootstrap_.size();
  peers_.assign(num_ranks, nullptr);
  imported_.clear();
  imported_.resize(num_ranks);
  mode_ = mode;

  // 1. allocate locally and describe the allocation
  PeerInfo mine;
  mine.rank = rank_;
  mine.mode = mode;
  mine.device = device_;
  mine.pid = static_cast<int32_t>(getpid());
  mine.ok = true;
  UniqueFd exported_fd;
  size_t granularity = 0;
  try {
    if (mode == MemMode::kCudaIpc) {
      granularity = 2u << 20;
      bytes_ = roundUp(bytes, granularity);
      auto own = std::make_unique<CudaMallocMapping>();
      EPCOMM_CUDA_CHECK(cudaMalloc(&own->ptr, bytes_));
      cudaIpcMemHandle_t handle{};
      EPCOMM_CUDA_CHECK(cudaIpcGetMemHandle(&handle, own->ptr));
      mine.handle.assign(reinterpret_cast<uint8_t*>(&handle),
                         reinterpret_cast<uint8_t*>(&handle) + sizeof(handle));
      own_ = std::move(own);
    } else {
      const DriverApi& api = DriverApi::get();
      const CUmemAllocationHandleType type = mode == MemMode::kFabric
                                                 ? CU_MEM_HANDLE_TYPE_FABRIC
                                                 : CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
      const CUmemAllocationProp prop = vmmProperties(device_, type);
      granularity = granularityOf(api, prop);
      bytes_ = roundUp(bytes, granularity);
      auto own = std::make_unique<VmmMapping>();
      own->size = bytes_;
      EPCOMM_CU_CHECK(api.memCreate(&own->handle, bytes_, &prop, 0));
      own->has_handle = true;
      own->mapForDevice(api, device_, granularity);
      if (mode == MemMode::kFabric) {
        CUmemFabricHandle fabric{};
        EPCOMM_CU_CHECK(api.memExportToShareableHandle(&fabric, own->handle,
                                                       CU_MEM_HANDLE_TYPE_FABRIC, 0));
        mine.handle.assign(reinterpret_cast<uint8_t*>(&fabric),
                           reinterpret_cast<uint8_t*>(&fabric) + sizeof(fabric));
      } else {
        int fd = -1;
        EPCOMM_CU_CHECK(api.memExportToShareableHandle(
            &fd, own->handle, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0));
        exported_fd.reset(fd);
      }
      own_ = std::move(own);
    }
    peers_[rank_] = own_->ptr;
  } catch (const std::exception& e) {
    mine.ok = false;
    mine.error = describe(e);
  }
  mine.bytes = bytes_;

  // 2. exchange descriptions; any failure or size mismatch stops every rank
  const std::vector<uint8_t> wire = serializePeerInfo(mine);
  std::vector<uint8_t> gathered(wire.size() * static_cast<size_t>(num_ranks));
  bootstrap_.allGather(wire.data(), gathered.data(), wire.size());
  std::vector<PeerInfo> infos;
  for (int r = 0; r < num_ranks; ++r) {
    infos.push_back(deserializePeerInfo(gathered.data() + r * wire.size(), wire.size()));
  }
  for (const PeerInfo& info : infos) {
    if (!info.ok) {
      *why = "rank " + std::to_string(info.rank) + " could not allocate " +
             std::to_string(bytes) + " bytes: " + info.error;
      releaseAll();
      return false;
    }
  }
  for (const PeerInfo& info : infos) {
    if (info.bytes != infos[0].bytes) {
      releaseAll();
      EPCOMM_CHECK_CODE(false, ErrorCode::kInvalidArgument,
                        "the symmetric buffer size differs across ranks: rank 0 needs "
                            << infos[0].bytes << " bytes, rank " << info.rank << " needs "
                            << info.bytes
                            << "; every rank must create its EpBuffer with the same BufferConfig");
    }
  }

  // 3. import and map every peer
  bool ok = true;
  std::string local_why;
  try {
    std::vector<UniqueFd> fds;
    if (mode == MemMode::kPosixFd) {
      fds = exchangeFds(bootstrap_, exported_fd.get(), timeout_s);
      exported_fd.reset();  // every peer holds its own copy now
    }
    for (int r = 0; r < num_ranks; ++r) {
      if (r == rank_) continue;
      const PeerInfo& info = infos[r];
      if (mode == MemMode::kCudaIpc) {
        EPCOMM_CHECK(info.pid != mine.pid || r == rank_,
                     "ranks " << rank_ << " and " << r
                              << " share one process; each rank needs its own process");
        cudaIpcMemHandle_t handle{};
        EPCOMM_CHECK(info.handle.size() == sizeof(handle), "bad CUDA IPC handle size");
        std::memcpy(&handle, info.handle.data(), sizeof(handle));
        auto mapping = std::make_unique<IpcImportMapping>();
        EPCOMM_CUDA_CHECK(
            cudaIpcOpenMemHandle(&mapping->ptr, handle, cudaIpcMemLazyEnablePeerAccess));
        peers_[r] = mapping->ptr;
        imported_[r] = std::move(mapping);
      } else {
        const DriverApi& api = DriverApi::get();
        auto mapping = std::make_unique<VmmMapping>();
        mapping->size = static_cast<size_t>(info.bytes);
        if (mode == MemMode::kFabric) {
          CUmemFabricHandle fabric{};
          EPCOMM_CHECK(info.handle.size() == sizeof(fabric), "bad fabric handle size");
          std::memcpy(&fabric, info.handle.data(), sizeof(fabric));
          EPCOMM_CU_CHECK(api.memImportFromShareableHandle(&mapping->handle, &fabric,
                                                           CU_MEM_HANDLE_TYPE_FABRIC));
        } else {
          EPCOMM_CHECK(fds[r].get() >= 0, "no fd received from rank " << r);
          // The POSIX fd import takes the fd value itself, cast to a pointer.
          EPCOMM_CU_CHECK(api.memImportFromShareableHandle(
              &mapping->handle, reinterpret_cast<void*>(static_cast<uintptr_t>(fds[r].get())),
              CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR));
          fds[r].reset();  // the imported handle keeps the memory alive
        }
        mapping->has_handle = true;
        mapping->mapForDevice(api, device_, granularity);
        peers_[r] = mapping->ptr;
        imported_[r] = std::move(mapping);
      }
    }
  } catch (const std::exception& e) {
    ok = false;
    local_why = describe(e);
  }
  std::string failure = agreeOnFailure(bootstrap_, ok, local_why);
  if (!failure.empty()) {
    *why = "mapping the peers failed on " + failure;
    releaseAll();
    // Everyone has closed its imports before anyone frees (CUDA IPC requires that order).
    bootstrap_.barrier();
    return false;
  }
  if (detail::logEnabled(LogLevel::kInfo)) {
    std::ostringstream map;
    for (const PeerInfo& info : infos) {
      map << " rank " << info.rank << ": device " << info.device << ", pid " << info.pid << ", "
          << peers_[info.rank] << (info.rank == rank_ ? " (own);" : ";");
    }
    EPCOMM_LOG_INFO("peer map (" << memModeName(mode) << "):" << map.str());
  }
  return true;
}

void SymmetricMemory::releaseAll() noexcept {
  imported_.clear();
  own_.reset();
  peers_.assign(peers_.size(), nullptr);
}

SymmetricMemory::~SymmetricMemory() {
  try {
    DeviceGuard guard(device_);
    imported_.clear();
    if (mode_ == MemMode::kCudaIpc) {
      // Freeing memory a peer still has open is undefined for CUDA IPC.
      try {
        bootstrap_.barrier();
      } catch (const std::exception& e) {
        detail::logWarning(std::string("teardown barrier failed: ") + e.what(), __FILE__,
                           __LINE__);
      }
    }
    own_.reset();
  } catch (const std::exception& e) {
    detail::logWarning(std::string("symmetric memory teardown: ") + e.what(), __FILE__, __LINE__);
  }
}

}  // namespace epcomm::memory
