// SPDX-License-Identifier: Apache-2.0
// Umbrella header: the whole core API (the MPI bootstrap lives in epcomm/mpi_bootstrap.hpp).
#pragma once

#include "epcomm/bootstrap.hpp"
#include "epcomm/buffer.hpp"
#include "epcomm/config.hpp"
#include "epcomm/error.hpp"
#include "epcomm/log.hpp"
#include "epcomm/ops.hpp"
#include "epcomm/version.hpp"
