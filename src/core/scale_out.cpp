// SPDX-License-Identifier: Apache-2.0
// The scale-out factory registry (core/scale_out.hpp).
#include "core/scale_out.hpp"

#include <mutex>
#include <utility>

#include "check.hpp"

namespace epcomm::core {
namespace {

std::mutex& factoryMutex() {
  static std::mutex m;
  return m;
}
ScaleOutFactory& factory() {
  static ScaleOutFactory f;
  return f;
}

}  // namespace

void setScaleOutFactory(ScaleOutFactory f) {
  std::lock_guard<std::mutex> lock(factoryMutex());
  factory() = std::move(f);
}

bool hasScaleOutFactory() {
  std::lock_guard<std::mutex> lock(factoryMutex());
  return static_cast<bool>(factory());
}

std::unique_ptr<ScaleOutOps> createScaleOut(Bootstrap& bootstrap, const BufferConfig& config) {
  ScaleOutFactory f;
  {
    std::lock_guard<std::mutex> lock(factoryMutex());
    f = factory();
  }
  EPCOMM_CHECK_CODE(static_cast<bool>(f), ErrorCode::kInternal,
                    "EpBuffer across nodes: no scale-out implementation registered");
  return f(bootstrap, config);
}

}  // namespace epcomm::core
