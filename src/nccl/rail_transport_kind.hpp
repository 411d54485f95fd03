// SPDX-License-Identifier: Apache-2.0
// Which rail transport backend (docs/scale-out.md "Rail transport"): the choice and its parsing,
// NCCL-free so the CPU unit tests cover it. The environment is read in one place
// (railTransportFromEnv, src/nccl/rail_transport.cpp).
#pragma once

#include <string>

namespace epcomm::nccl {

enum class RailTransportKind {
  kHostApi,  // grouped ncclSend/ncclRecv (RailExchange), the default; every NCCL >= 2.28
  kGin,      // device-initiated puts (GinRailExchange), NCCL >= 2.30 headers with GIN
};

inline const char* railTransportName(RailTransportKind kind) {
  return kind == RailTransportKind::kGin ? "gin" : "nccl";
}

// EPCOMM_RAIL_TRANSPORT: unset or empty, "nccl", "host" -> kHostApi; "gin" -> kGin (case-
// insensitive). Anything else: returns false and leaves `kind` alone (the caller throws naming the
// variable and the accepted values; there is no silent fallback).
inline bool parseRailTransport(const char* text, RailTransportKind* kind) {
  std::string lower;
  for (const char* c = text; c != nullptr && *c != '\0'; ++c) {
    lower.push_back(*c >= 'A' && *c <= 'Z' ? static_cast<char>(*c - 'A' + 'a') : *c);
  }
  if (lower.empty() || lower == "nccl" || lower == "host") {
    *kind = RailTransportKind::kHostApi;
    return true;
  }
  if (lower == "gin") {
    *kind = RailTransportKind::kGin;
    return true;
  }
  return false;
}

}  // namespace epcomm::nccl
