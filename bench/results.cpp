// SPDX-License-Identifier: Apache-2.0
#include "results.hpp"

#include <algorithm>

#include "timing.hpp"

namespace epcomm::bench {

void RowRecorder::add(const RowSpec& spec, const std::vector<float>& samples,
                      const std::optional<Bytes>& bytes, const std::optional<double>& nccl_med_us) {
  Row r;
  r.op = spec.op;
  r.dtype = spec.dtype;
  r.tokens = spec.tokens;
  r.hidden = spec.hidden;
  r.topk = work_.topk;
  r.experts = work_.experts;
  r.ranks = ranks_.size;
  r.sms = spec.sms;
  r.input_sets = spec.input_sets;
  const Stats local = summarize(samples);
  r.time = reduceStats(ranks_, local);
  if (bytes) addBandwidth(r, local.med_us, *bytes);
  if (nccl_med_us && r.time.med_us > 0) {
    r.nccl_med_us = *nccl_med_us;
    r.vs_nccl = *nccl_med_us / r.time.med_us;
  }
  if (ranks_.root()) printRowLive(r, rows_.empty());
  rows_.push_back(r);
}

// GB/s per rank from its own bytes and median; the slowest rank is reported.
void RowRecorder::addBandwidth(Row& r, double med_us, const Bytes& bytes) const {
  const double med = std::max(med_us, 1e-3);
  r.logical_bytes_min = allMin(ranks_, bytes.logical);
  r.logical_bytes_max = allMax(ranks_, bytes.logical);
  r.link_bytes_min = allMin(ranks_, bytes.link);
  r.link_bytes_max = allMax(ranks_, bytes.link);
  if (*r.logical_bytes_max > 0) {
    r.logical_gbps = allMin(ranks_, bytes.logical / med / 1e3);
    r.logical_gbps_max = allMax(ranks_, bytes.logical / med / 1e3);
  }
  if (*r.link_bytes_max > 0) {
    r.link_gbps = allMin(ranks_, bytes.link / med / 1e3);
    r.link_gbps_max = allMax(ranks_, bytes.link / med / 1e3);
    if (link_limit_gbps_ && *link_limit_gbps_ > 0) {
      r.link_pct = *r.link_gbps / *link_limit_gbps_ * 100.0;
    }
  }
}

}  // namespace epcomm::bench
