// SPDX-License-Identifier: Apache-2.0
// ep_bench across nodes (docs/scale-out.md, "ep_bench rows"): when the ranks span several nodes
// (EPCOMM_HOSTID per rank, or several hosts), ep_bench runs EpBuffer hierarchically (epcomm_nccl,
// epcomm::nccl::enableScaleOut()) and prints its own table instead of the one-node rows: HT
// dispatch / combine and LL dispatch / combine times, and the network bytes per rank.
#pragma once

#include "epcomm/bootstrap.hpp"
#include "machine.hpp"
#include "options.hpp"
#include "ranks.hpp"
#include "src/core/topology.hpp"

namespace epcomm::bench {

// Collective over every rank. Returns the exit code (1 when ep_bench was built without
// epcomm_nccl: it cannot run across nodes then).
int runScaleOutRows(const Options& o, const Ranks& ranks, Bootstrap& bootstrap,
                    const Machine& machine, const core::Topology& topology);

}  // namespace epcomm::bench
