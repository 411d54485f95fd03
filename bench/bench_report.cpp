// SPDX-License-Identifier: Apache-2.0
// Fixed-width and JSON renderings of ep_bench's results (rank 0 only).
#include "bench_report.hpp"

#include <algorithm>
#include <cstdio>
#include <fstream>

namespace epcomm::bench {

namespace {

std::string format(const char* fmt, double value) {
  char text[64];
  std::snprintf(text, sizeof(text), fmt, value);
  return text;
}

std::string orNa(const std::optional<double>& value, const char* fmt) {
  return value ? format(fmt, *value) : std::string("n/a");
}

nlohmann::ordered_json orNull(const std::optional<double>& value) {
  return value ? nlohmann::ordered_json(*value) : nlohmann::ordered_json(nullptr);
}

std::string tableHeader() {
  char text[256];
  std::snprintf(text, sizeof(text),
                "%-18s %-5s %6s %6s %4s %7s %5s %4s %9s %9s %9s %12s %9s %6s %7s", "op", "dtype",
                "tokens", "hidden", "topk", "experts", "ranks", "SMs", "med us", "min us", "max us",
                "logical GB/s", "link GB/s", "link %", "vs NCCL");
  return text;
}

std::string tableRow(const Row& r) {
  const std::string sms = r.sms > 0 ? std::to_string(r.sms) : "n/a";
  char text[512];
  std::snprintf(text, sizeof(text),
                "%-18s %-5s %6d %6d %4d %7d %5d %4s %9.1f %9.1f %9.1f %12s %9s %6s %7s",
                r.op.c_str(), r.dtype.c_str(), r.tokens, r.hidden, r.topk, r.experts, r.ranks,
                sms.c_str(), r.time.med_us, r.time.min_us, r.time.max_us,
                orNa(r.logical_gbps, "%.1f").c_str(), orNa(r.link_gbps, "%.1f").c_str(),
                orNa(r.link_pct, "%.1f").c_str(), orNa(r.vs_nccl, "%.2fx").c_str());
  return text;
}

}  // namespace

void printSetup(const Setup& setup) {
  size_t width = 0;
  for (const auto& [key, text] : setup.lines) width = std::max(width, key.size());
  std::printf("ep_bench setup\n");
  for (const auto& [key, text] : setup.lines) {
    std::printf("  %-*s  %s\n", static_cast<int>(width), key.c_str(), text.c_str());
  }
  std::printf("\n");
}

std::string LinkRow::label() const {
  return chunk_bytes > 0 ? method + " " + std::to_string(chunk_bytes / 1024) + "K" : method;
}

std::vector<LinkRow> bestBulkRows(const std::vector<LinkRow>& rows) {
  std::vector<LinkRow> best;
  for (const LinkRow& r : rows) {
    if (r.chunk_bytes == 0 || r.check != "ok") continue;
    auto same = std::find_if(best.begin(), best.end(), [&](const LinkRow& b) {
      return b.method == r.method && b.sms == r.sms;
    });
    if (same == best.end()) {
      best.push_back(r);
    } else if (r.gbps_min > same->gbps_min) {
      *same = r;
    }
  }
  return best;
}

void printLinkTable(const std::vector<LinkRow>& rows, const std::string& note) {
  std::printf(
      "Link limit (GB/s per rank, every rank moving data to/from every peer at once; "
      "min over ranks)\n");
  if (rows.empty()) {
    std::printf("  %s\n\n", note.c_str());
    return;
  }
  int width = 12;
  for (const LinkRow& r : rows) width = std::max(width, static_cast<int>(r.label().size()));
  std::printf("  %-*s %5s %10s %10s %9s %9s\n", width, "method", "SMs", "MiB/rank", "med us",
              "GB/s", "max GB/s");
  for (const LinkRow& r : rows) {
    const std::string sms = r.sms > 0 ? std::to_string(r.sms) : "CE";
    const double mib = r.bytes_per_rank / (1024.0 * 1024.0);
    if (r.failed()) {
      // A copy that failed its check (or could not run) shows no time and no bandwidth.
      std::printf("  %-*s %5s %10.1f %10s %9s %9s\n", width, r.label().c_str(), sms.c_str(), mib,
                  r.check.c_str(), r.check.c_str(), r.check.c_str());
    } else {
      std::printf("  %-*s %5s %10.1f %10.1f %9.1f %9.1f\n", width, r.label().c_str(), sms.c_str(),
                  mib, r.med_us_max, r.gbps_min, r.gbps_max);
    }
  }
  if (!note.empty()) std::printf("  %s\n", note.c_str());
  for (const LinkRow& b : bestBulkRows(rows)) {
    // Next to the 16-byte-vector kernel of the same direction and SM count.
    const std::string plain = b.method == "SM bulk store" ? "SM store" : "SM load";
    std::string versus;
    for (const LinkRow& r : rows) {
      if (r.method == plain && r.sms == b.sms) versus = format("%.1f GB/s", r.gbps_min);
    }
    std::printf("  best %s with %d SMs: %d KiB x %d stages, %.1f GB/s (%s: %s)\n", b.method.c_str(),
                b.sms, b.chunk_bytes / 1024, b.stages, b.gbps_min, plain.c_str(),
                versus.empty() ? "n/a" : versus.c_str());
  }
  std::printf("\n");
}

void printTable(const std::vector<Row>& rows) {
  std::printf("%s\n", tableHeader().c_str());
  for (const Row& r : rows) std::printf("%s\n", tableRow(r).c_str());
  std::printf("\n");
}

void printRowLive(const Row& row, bool first) {
  if (first) std::fprintf(stderr, "ep_bench:   %s\n", tableHeader().c_str());
  std::fprintf(stderr, "ep_bench:   %s\n", tableRow(row).c_str());
  std::fflush(stderr);
}

void printSmBudgets(const std::vector<Row>& rows) {
  // Rows of one op and shape, in measurement order (the first --sms value first).
  auto sameCase = [](const Row& a, const Row& b) {
    return a.op == b.op && a.dtype == b.dtype && a.tokens == b.tokens && a.hidden == b.hidden;
  };
  std::vector<std::vector<const Row*>> groups;
  for (const Row& r : rows) {
    if (r.sms <= 0 || r.op.rfind("ll ", 0) == 0) continue;  // LL rows have their own sweep
    auto group = std::find_if(groups.begin(), groups.end(),
                              [&](const auto& g) { return sameCase(*g.front(), r); });
    if (group == groups.end()) {
      groups.push_back({&r});
    } else {
      group->push_back(&r);
    }
  }
  bool header = false;
  for (const auto& group : groups) {
    if (group.size() < 2) continue;
    if (!header) {
      std::printf(
          "SM budgets (HT; SM x us = SMs x median us, the SM time taken from other work)\n");
      std::printf("%-18s %-5s %6s %4s %9s %10s %6s %9s\n", "op", "dtype", "tokens", "SMs", "med us",
                  "SM x us", "link %", "vs first");
      header = true;
    }
    const double first_us = group.front()->time.med_us;
    for (const Row* r : group) {
      std::printf("%-18s %-5s %6d %4d %9.1f %10.0f %6s %8.2fx\n", r->op.c_str(), r->dtype.c_str(),
                  r->tokens, r->sms, r->time.med_us, r->sms * r->time.med_us,
                  orNa(r->link_pct, "%.1f").c_str(), r->time.med_us / first_us);
    }
  }
  if (header) std::printf("\n");
}

void printTargets(const std::vector<Target>& targets) {
  std::printf("Targets\n");
  size_t width = 0;
  for (const Target& t : targets) width = std::max(width, t.name.size());
  for (const Target& t : targets) {
    const char* verdict = !t.value ? "n/a"
                          : (t.at_least ? *t.value >= t.threshold : *t.value <= t.threshold)
                              ? "PASS"
                              : "MISS";
    const std::string value =
        (t.value ? format("%.2f", *t.value) : std::string("n/a")) + " " + t.unit;
    const std::string target =
        std::string(t.at_least ? ">= " : "<= ") + format("%g", t.threshold) + " " + t.unit;
    std::printf("  %-*s %12s   target %-9s %-4s  %s\n", static_cast<int>(width), t.name.c_str(),
                value.c_str(), target.c_str(), verdict, t.note.c_str());
  }
  std::printf("\n");
}

std::string writeJson(const std::string& path, const nlohmann::ordered_json& options,
                      const Setup& setup, const std::vector<LinkRow>& link,
                      const std::optional<double>& link_limit_gbps, const std::vector<Row>& rows,
                      const std::vector<Target>& targets, const nlohmann::ordered_json& fixed_cost,
                      const nlohmann::ordered_json& stage_times) {
  nlohmann::ordered_json doc;
  doc["options"] = options;
  doc["setup"] = setup.json;
  nlohmann::ordered_json link_json = nlohmann::ordered_json::array();
  for (const LinkRow& r : link) {
    nlohmann::ordered_json m = {{"method", r.method},
                                {"sms", r.sms},
                                {"bytes_per_rank", r.bytes_per_rank},
                                {"med_us_max", r.med_us_max},
                                {"gbps_min", r.gbps_min},
                                {"gbps_max", r.gbps_max}};
    if (r.chunk_bytes > 0) {
      // Bulk rows: a failed check leaves no time and no bandwidth (null), only its verdict.
      if (r.failed()) {
        m["med_us_max"] = nullptr;
        m["gbps_min"] = nullptr;
        m["gbps_max"] = nullptr;
      }
      m["chunk_bytes"] = r.chunk_bytes;
      m["stages"] = r.stages;
      m["check"] = r.check;
    }
    link_json.push_back(m);
  }
  nlohmann::ordered_json bulk_best = nlohmann::ordered_json::array();
  for (const LinkRow& b : bestBulkRows(link)) {
    bulk_best.push_back({{"method", b.method},
                         {"sms", b.sms},
                         {"chunk_bytes", b.chunk_bytes},
                         {"stages", b.stages},
                         {"gbps_min", b.gbps_min}});
  }
  if (!fixed_cost.is_null()) doc["fixed_cost"] = fixed_cost;
  if (!stage_times.is_null()) doc["stage_times"] = stage_times;
  doc["link"] = {{"limit_gbps", orNull(link_limit_gbps)},
                 {"limit_method", "SM store, all SMs, min over ranks"},
                 {"measurements", link_json},
                 {"bulk_best", bulk_best}};
  nlohmann::ordered_json rows_json = nlohmann::ordered_json::array();
  for (const Row& r : rows) {
    rows_json.push_back(
        {{"op", r.op},
         {"dtype", r.dtype},
         {"tokens", r.tokens},
         {"hidden", r.hidden},
         {"topk", r.topk},
         {"experts", r.experts},
         {"ranks", r.ranks},
         {"sms", r.sms > 0 ? nlohmann::ordered_json(r.sms) : nullptr},
         {"sm_x_us", r.sms > 0 ? nlohmann::ordered_json(r.sms * r.time.med_us) : nullptr},
         {"input_sets", r.input_sets},
         {"med_us", r.time.med_us},
         {"min_us", r.time.min_us},
         {"max_us", r.time.max_us},
         {"logical_bytes_per_rank_min", orNull(r.logical_bytes_min)},
         {"logical_bytes_per_rank_max", orNull(r.logical_bytes_max)},
         {"link_bytes_per_rank_min", orNull(r.link_bytes_min)},
         {"link_bytes_per_rank_max", orNull(r.link_bytes_max)},
         {"logical_gbps", orNull(r.logical_gbps)},
         {"link_gbps", orNull(r.link_gbps)},
         {"logical_gbps_max", orNull(r.logical_gbps_max)},
         {"link_gbps_max", orNull(r.link_gbps_max)},
         {"link_pct", orNull(r.link_pct)},
         {"nccl_med_us", orNull(r.nccl_med_us)},
         {"vs_nccl", orNull(r.vs_nccl)}});
  }
  doc["rows"] = rows_json;
  nlohmann::ordered_json targets_json = nlohmann::ordered_json::array();
  for (const Target& t : targets) {
    const bool pass = t.value && (t.at_least ? *t.value >= t.threshold : *t.value <= t.threshold);
    targets_json.push_back({{"name", t.name},
                            {"value", orNull(t.value)},
                            {"unit", t.unit},
                            {"comparison", t.at_least ? ">=" : "<="},
                            {"threshold", t.threshold},
                            {"status", !t.value ? "n/a"
                                       : pass   ? "PASS"
                                                : "MISS"},
                            {"source", t.note}});
  }
  doc["targets"] = targets_json;

  std::ofstream out(path);
  if (!out) return "cannot open " + path + " for writing";
  out << doc.dump(2) << "\n";
  out.close();
  if (!out) return "writing " + path + " failed";
  return "";
}

}  // namespace epcomm::bench
