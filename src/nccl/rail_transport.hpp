// SPDX-License-Identifier: Apache-2.0
// The rail transport interface (docs/scale-out.md "Rail transport"): what ScaleOutBuffer needs of
// the network leg, with two backends behind it. Internal to epcomm_nccl.
//
//   nccl  RailExchange (rail_exchange.hpp): grouped ncclSend/ncclRecv on the rail communicator,
//         exact and worst-case modes. The default; run on GPUs.
//   gin   GinRailExchange (rail_gin.hpp): worst-case calls as device-initiated GIN puts into the
//         rail peers' registered windows with signals (NCCL's device API, >= 2.30); exact calls
//         stay on the host API. Built only when the NCCL headers have it (EPCOMM_NCCL_GIN);
//         compile-tested, never run (no RDMA NIC here).
//
// Both take the same RailExchangeArgs, judge the same count records with the same function
// (kernels/rail_protocol.hpp) and report the same errors, so the caller does not know which runs.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>

#include "nccl/rail_exchange.hpp"
#include "nccl/rail_transport_kind.hpp"

namespace epcomm::nccl {

class RailTransport {
 public:
  virtual ~RailTransport() = default;
  // As RailExchange::exchange (collective over the rail, same arguments, same errors).
  virtual RailExchangeResult exchange(const RailExchangeArgs& args, cudaStream_t stream) = 0;
  // As RailExchange::wait: host wait with the deadline; throws a worst-case call's fault.
  virtual void wait(cudaStream_t stream) = 0;
  // Device: the last call's judged receive counts and offsets (rows), as RailExchange.
  virtual const int32_t* recvCountsDevice() const = 0;
  virtual const int64_t* recvOffsetsDevice() const = 0;
  virtual RailTransportKind kind() const = 0;
};

// Limits fixed at creation (the GIN backend registers windows of this size; the host-API backend
// ignores them).
struct RailTransportLimits {
  // Largest max_rows * row_bytes of any worst-case call: the bytes of one (source, destination)
  // slot. The same on every rail rank.
  int64_t worst_case_slot_bytes = 0;
};

// EPCOMM_RAIL_TRANSPORT (rail_transport_kind.hpp), read here and only here. A bad value throws
// InvalidArgument naming the variable, the value and the accepted ones.
RailTransportKind railTransportFromEnv();

// Whether this build has the GIN backend (compiled against NCCL >= 2.30 headers with GIN).
bool ginBackendBuilt();

// Throws Error(kUnsupported), saying what to rebuild against, when `kind` is not in this build.
// Local; no NCCL call.
void checkRailTransportBuilt(RailTransportKind kind);

// Creates the backend on `rail` (which must outlive it). kHostApi: not collective. kGin: collective
// over the rail (window registration, device communicator); throws Error(kUnsupported) when this
// build has no GIN backend, the loaded NCCL is older than 2.30 or reports no GIN network for the
// rail (the message quotes what ncclCommQueryProperties / ncclDevCommCreate said), before any
// collective call where it can.
std::unique_ptr<RailTransport> createRailTransport(RailTransportKind kind, RailComm& rail,
                                                   double timeout_s,
                                                   const RailTransportLimits& limits);

}  // namespace epcomm::nccl
