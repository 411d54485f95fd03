// SPDX-License-Identifier: Apache-2.0
// The rail transport's backend choice (rail_transport.hpp): the host-API adapter and the factory.
#include "nccl/rail_transport.hpp"

#include <cstdlib>
#include <string>

#include "check.hpp"
#if defined(EPCOMM_NCCL_GIN)
#include "nccl/rail_gin.hpp"
#endif

namespace epcomm::nccl {

namespace {

// The default backend: RailExchange as it is.
class HostApiTransport final : public RailTransport {
 public:
  HostApiTransport(RailComm& rail, double timeout_s) : exchange_(rail, timeout_s) {}
  RailExchangeResult exchange(const RailExchangeArgs& args, cudaStream_t stream) override {
    return exchange_.exchange(args, stream);
  }
  void wait(cudaStream_t stream) override { exchange_.wait(stream); }
  const int32_t* recvCountsDevice() const override { return exchange_.recvCountsDevice(); }
  const int64_t* recvOffsetsDevice() const override { return exchange_.recvOffsetsDevice(); }
  RailTransportKind kind() const override { return RailTransportKind::kHostApi; }

 private:
  RailExchange exchange_;
};

}  // namespace

RailTransportKind railTransportFromEnv() {
  const char* text = std::getenv("EPCOMM_RAIL_TRANSPORT");
  RailTransportKind kind = RailTransportKind::kHostApi;
  EPCOMM_ARG_CHECK(parseRailTransport(text, &kind), "EPCOMM_RAIL_TRANSPORT",
                   "'" << (text != nullptr ? text : "") << "'",
                   "one of nccl (the default; also host or empty) or gin");
  return kind;
}

bool ginBackendBuilt() {
#if defined(EPCOMM_NCCL_GIN)
  return true;
#else
  return false;
#endif
}

std::unique_ptr<RailTransport> createRailTransport(RailTransportKind kind, RailComm& rail,
                                                   double timeout_s,
                                                   const RailTransportLimits& limits) {
  if (kind == RailTransportKind::kHostApi) {
    return std::make_unique<HostApiTransport>(rail, timeout_s);
  }
  checkRailTransportBuilt(kind);
#if defined(EPCOMM_NCCL_GIN)
  return makeGinRailTransport(rail, timeout_s, limits);
#else
  (void)limits;
  return nullptr;
#endif
}

void checkRailTransportBuilt(RailTransportKind kind) {
  if (kind != RailTransportKind::kGin || ginBackendBuilt()) return;
  EPCOMM_CHECK_CODE(false, ErrorCode::kUnsupported,
                    "EPCOMM_RAIL_TRANSPORT=gin, but this epcomm_nccl was built without the GIN "
                    "backend (compiled against NCCL "
                        << buildVersion()
                        << " headers; it needs NCCL >= 2.30 headers with the device API's GIN: "
                           "configure with EPCOMM_NCCL_ROOT pointing at such an NCCL; the "
                           "configure output then lists gin among the rail transports). Unset "
                           "EPCOMM_RAIL_TRANSPORT to use the host-API transport");
}

}  // namespace epcomm::nccl
