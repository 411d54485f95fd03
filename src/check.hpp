// SPDX-License-Identifier: Apache-2.0
// Forwarding header: the check macros live in the internal utility target (util/check.hpp). The
// internal logging macros come along, as they always did for the library's sources.
#pragma once

#include "log_internal.hpp"
#include "util/check.hpp"
