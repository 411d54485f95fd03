// SPDX-License-Identifier: Apache-2.0
// The GIN rail transport (docs/scale-out.md "Rail transport", protocol in
// kernels/rail_gin_protocol.hpp): worst-case calls as device-initiated puts of NCCL's device API
// (one ncclGin::put per peer, [count record | rows], with a signal increment bundled with it, into
// the rail peers' registered windows; credits so a slot is rewritten only once consumed), exact
// calls on the host API (RailExchange). Compiled only when EPCOMM_NCCL_GIN (NCCL >= 2.30 headers
// with GIN); compile-tested against NCCL 2.32.3, never run: no RDMA NIC here.
//
// Creation (collective over the rail, every NCCL call polled with the deadline): the loaded NCCL
// must be >= 2.30 and ncclCommQueryProperties must report the device API and a GIN type, else
// Error(kUnsupported) quoting what NCCL said, before any collective call; then two windows from
// ncclMemAlloc registered with ncclCommWindowRegister, and a device communicator
// (ncclDevCommCreate: 2 GIN signals per node, one context, full connection on the rail, whose
// world team is the rail). A failure there is Error(kUnsupported) with NCCL's result and last
// error.
//
// Per worst-case call, on the stream (graph-capturable: fixed sizes, the epoch is a device
// counter): pack the record and the slots into the send window, the GIN kernel, the judge
// (the host-API transport's kernel, the same verdicts), unpack the judged rows into the caller's
// receive buffer. One extra device copy each way compared with registering the caller's buffers:
// they differ per call, registration is collective and slow.
#pragma once

#include <memory>

#include "nccl/rail_transport.hpp"

namespace epcomm::nccl {

std::unique_ptr<RailTransport> makeGinRailTransport(RailComm& rail, double timeout_s,
                                                    const RailTransportLimits& limits);

}  // namespace epcomm::nccl
