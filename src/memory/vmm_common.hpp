// SPDX-License-Identifier: Apache-2.0
// What the two VMM modes (fabric, POSIX fd) share: cuMemCreate + reserve + map + access for this
// rank's allocation, import + reserve + map + access for a peer's. The modes differ only in how
// a handle is exported and imported.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

#include "memory/driver_api.hpp"
#include "memory/sharing_mode.hpp"

namespace epcomm::memory {

// A VMM allocation (created here or imported): physical handle + VA reservation + mapping,
// released in reverse order.
struct VmmMapping : Mapping {
  CUmemGenericAllocationHandle handle = 0;
  bool has_handle = false;
  CUdeviceptr va = 0;
  size_t size = 0;
  bool mapped = false;

  ~VmmMapping() override;

  // Reserves VA, maps the handle and grants this process's device read/write access.
  void mapForDevice(const DriverApi& api, int device, size_t granularity);
};

CUmemAllocationProp vmmProperties(int device, CUmemAllocationHandleType type);
size_t granularityOf(const DriverApi& api, const CUmemAllocationProp& prop);

// Reads a device attribute, treating a failed query as an error (never as "0 = unsupported").
int deviceAttribute(const DriverApi& api, CUdevice_attribute attribute, int device,
                    const char* name);

class VmmMode : public SharingMode {
 public:
  size_t granularity() override;
  std::unique_ptr<Mapping> allocate(size_t bytes, PeerInfo* mine) override;
  std::unique_ptr<Mapping> import(int peer_rank, const PeerInfo& peer) override;

 protected:
  VmmMode(int device, CUmemAllocationHandleType type) : device_(device), type_(type) {}

  // Makes this rank's `handle` importable: into `mine` (fabric), or kept for exchange() (fd).
  virtual void exportHandle(const DriverApi& api, CUmemGenericAllocationHandle handle,
                            PeerInfo* mine) = 0;
  // Imports the allocation handle of peer rank `peer_rank`.
  virtual CUmemGenericAllocationHandle importHandle(const DriverApi& api, int peer_rank,
                                                    const PeerInfo& peer) = 0;

  const int device_;

 private:
  const CUmemAllocationHandleType type_;
  size_t granularity_ = 0;
};

}  // namespace epcomm::memory
