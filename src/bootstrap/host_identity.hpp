// SPDX-License-Identifier: Apache-2.0
// This process's host identity ("hostname|boot id"), shared by Bootstrap's node-local grouping
// and the cross-node topology (core/topology.hpp). Internal.
#pragma once

#include <string>

namespace epcomm::detail {

std::string hostIdentityText();

}  // namespace epcomm::detail
