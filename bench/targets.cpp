// SPDX-License-Identifier: Apache-2.0
#include "targets.hpp"

#include <optional>
#include <string>

namespace epcomm::bench {

namespace {

enum class Metric {
  kLinkPct,       // link %
  kVsNccl,        // NCCL median / epcomm median
  kMedianUs,      // median time
  kTimeOverBf16,  // median / the median of the same op in BF16
};

enum class Scope {
  kMainCase,    // --tokens, --hidden, the first --sms value
  kZeroTokens,  // the 0-token round trip, first --sms value
  kLlBatch,     // --ll-tokens (the target is defined for 128 tokens); skipped when that is 1
  kLlOneToken,  // 1 token
};

struct TargetDef {
  const char* name;  // LL names get " @<tokens> tok"
  const char* op;
  const char* dtype;
  Metric metric;
  const char* unit;
  bool at_least;  // PASS when value >= threshold (else value <= threshold)
  double threshold;
  Scope scope;
};

constexpr int kLlTargetTokens = 128;

constexpr TargetDef kTargets[] = {
    {"BF16 dispatch link %", "dispatch", "bf16", Metric::kLinkPct, "%", true, 90.0,
     Scope::kMainCase},
    {"BF16 combine link %", "combine", "bf16", Metric::kLinkPct, "%", true, 85.0, Scope::kMainCase},
    {"FP8/BF16 dispatch time", "dispatch", "fp8", Metric::kTimeOverBf16, "x", false, 0.55,
     Scope::kMainCase},
    {"BF16 dispatch vs NCCL", "dispatch", "bf16", Metric::kVsNccl, "x", true, 1.5,
     Scope::kMainCase},
    {"BF16 combine vs NCCL", "combine", "bf16", Metric::kVsNccl, "x", true, 1.5, Scope::kMainCase},
    {"d+c 0 tokens", "d+c 0 tokens", "bf16", Metric::kMedianUs, "us", false, 15.0,
     Scope::kZeroTokens},
    {"ll dispatch bf16", "ll dispatch", "bf16", Metric::kMedianUs, "us", false, 12.0,
     Scope::kLlBatch},
    {"ll dispatch fp8", "ll dispatch", "fp8", Metric::kMedianUs, "us", false, 12.0,
     Scope::kLlBatch},
    {"ll combine bf16", "ll combine", "bf16", Metric::kMedianUs, "us", false, 12.0,
     Scope::kLlBatch},
    {"ll dispatch bf16", "ll dispatch", "bf16", Metric::kMedianUs, "us", false, 8.0,
     Scope::kLlOneToken},
    {"ll dispatch fp8", "ll dispatch", "fp8", Metric::kMedianUs, "us", false, 8.0,
     Scope::kLlOneToken},
    {"ll combine bf16", "ll combine", "bf16", Metric::kMedianUs, "us", false, 8.0,
     Scope::kLlOneToken},
};

bool isLl(Scope scope) {
  return scope == Scope::kLlBatch || scope == Scope::kLlOneToken;
}

// The first row of the op at these tokens and the main hidden size; sms 0 = any SM budget.
const Row* findRow(const std::vector<Row>& rows, const std::string& op, const std::string& dtype,
                   int tokens, int hidden, int sms) {
  for (const Row& r : rows) {
    if (r.op == op && r.dtype == dtype && r.tokens == tokens && r.hidden == hidden &&
        (sms == 0 || r.sms == sms)) {
      return &r;
    }
  }
  return nullptr;
}

std::optional<double> valueOf(const TargetDef& def, const std::vector<Row>& rows, int tokens,
                              int hidden, int sms) {
  const Row* r = findRow(rows, def.op, def.dtype, tokens, hidden, sms);
  if (r == nullptr) return std::nullopt;
  switch (def.metric) {
    case Metric::kLinkPct:
      return r->link_pct;
    case Metric::kVsNccl:
      return r->vs_nccl;
    case Metric::kMedianUs:
      return r->time.med_us;
    case Metric::kTimeOverBf16: {
      const Row* bf16 = findRow(rows, def.op, "bf16", tokens, hidden, sms);
      if (bf16 == nullptr || bf16->time.med_us <= 0) return std::nullopt;
      return r->time.med_us / bf16->time.med_us;
    }
  }
  return std::nullopt;
}

}  // namespace

std::vector<Target> evaluateTargets(const std::vector<Row>& rows, const TargetCase& where) {
  const std::string main_case = "tokens=" + std::to_string(where.tokens) +
                                " hidden=" + std::to_string(where.hidden) +
                                " SMs=" + std::to_string(where.sms);
  std::vector<Target> out;
  for (const TargetDef& def : kTargets) {
    Target t{def.name, std::nullopt, def.unit, def.at_least, def.threshold, main_case};
    if (def.scope == Scope::kMainCase) {
      t.value = valueOf(def, rows, where.tokens, where.hidden, where.sms);
    } else if (def.scope == Scope::kZeroTokens) {
      t.value = valueOf(def, rows, 0, where.hidden, where.sms);
      t.note = "median, SMs=" + std::to_string(where.sms);
    } else if (isLl(def.scope)) {
      const int tokens = def.scope == Scope::kLlOneToken ? 1 : where.ll_tokens;
      if (def.scope == Scope::kLlBatch && tokens == 1) continue;  // the 1-token lines cover it
      t.name += " @" + std::to_string(tokens) + " tok";
      if (where.ll) t.value = valueOf(def, rows, tokens, where.hidden, 0);
      t.note = tokens == 1 || tokens == kLlTargetTokens
                   ? std::string("median")
                   : "median (target defined for " + std::to_string(kLlTargetTokens) + " tokens)";
    }
    out.push_back(t);
  }
  return out;
}

}  // namespace epcomm::bench
