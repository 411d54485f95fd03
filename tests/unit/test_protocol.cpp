// SPDX-License-Identifier: Apache-2.0
// The protocol encoders host and device share (kernels/protocol.hpp) at the library's limits:
// rank kMaxRanks - 1 in rejection reports and fault notices, 1024 experts in the HT call
// signature, rank-mask word counts, and the size of the control region.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <set>
#include <type_traits>

#include "epcomm/config.hpp"
#include "kernels/protocol.hpp"

namespace epcomm::kernels {
namespace {

TEST(ProtocolLimits, RejectionReportRoundTripsEveryRankAndOp) {
  const uint64_t epochs[] = {1, 2, 0xffffffffull, (uint64_t{1} << 48) - 1};
  for (int rank = 0; rank < kMaxRanks; ++rank) {
    for (int op = 1; op < static_cast<int>(OpId::kCount); ++op) {
      for (uint64_t epoch : epochs) {
        const uint64_t report = rejectionReport(rank, static_cast<OpId>(op), epoch);
        ASSERT_EQ(rejectionRank(report), rank) << "op " << op << " epoch " << epoch;
        ASSERT_EQ(static_cast<int>(rejectionOp(report)), op) << "rank " << rank;
        ASSERT_EQ(rejectionEpoch(report), epoch) << "rank " << rank << " op " << op;
        ASSERT_NE(report, 0u);  // 0 means "no report"
      }
    }
  }
  const uint64_t last = rejectionReport(71, OpId::kLlCombineRecv, 12345);
  EXPECT_EQ(rejectionRank(last), 71);
  EXPECT_EQ(rejectionOp(last), OpId::kLlCombineRecv);
  EXPECT_EQ(rejectionEpoch(last), 12345u);
}

TEST(ProtocolLimits, FaultNoticeRoundTripsRank71) {
  for (int rank : {0, 7, 8, 31, 32, 63, 64, 71, kMaxRanks - 1}) {
    const uint32_t kind_op = faultKindOp(FailKind::kBadPeerData, OpId::kHtDispatch);
    const uint64_t notice = faultNotice(rank, kind_op);
    EXPECT_NE(notice, 0u);  // 0 means "no fault"
    EXPECT_EQ(faultNoticeRank(notice), rank);
    EXPECT_EQ(faultNoticeKindOp(notice), kind_op);
    EXPECT_EQ(faultKindOf(faultNoticeKindOp(notice)), static_cast<int>(FailKind::kBadPeerData));
    EXPECT_EQ(faultOpOf(faultNoticeKindOp(notice)), static_cast<int>(OpId::kHtDispatch));
  }
}

TEST(ProtocolLimits, TaggedWordsKeepValueAndEpoch) {
  const uint64_t word = tag(0x1'0000'0005ull, 0xfffffffeu);
  EXPECT_EQ(tagValue(word), 0xfffffffeu);
  EXPECT_TRUE(tagReached(word, 5));
  EXPECT_FALSE(tagReached(word, 6));
  // Count-matrix entries at 72 ranks: a count up to kMaxTokensPerRank and the rank-count words.
  EXPECT_EQ(tagValue(tag(3, kMaxTokensPerRank)), static_cast<uint32_t>(kMaxTokensPerRank));
}

TEST(ProtocolLimits, HtSignatureTellsExpertCountsUpTo1024Apart) {
  // With 10 bits, 1024 read as 0 and 1025.. wrapped: every count up to the limit must decode to
  // itself and differ from every other.
  const SignatureField& experts = kHtSignatureFields[5];
  ASSERT_STREQ(experts.name, "num_experts");
  std::set<uint64_t> seen;
  for (int e = 1; e <= kMaxExperts; ++e) {
    const uint64_t sig = htSignature(7168, false, true, 16, true, e, 1);
    ASSERT_EQ(signatureValue(experts, sig), e);
    ASSERT_TRUE(seen.insert(sig).second) << "num_experts " << e << " aliases another count";
  }
  EXPECT_NE(htSignature(7168, true, true, 8, true, 1024, 128),
            htSignature(7168, true, true, 8, true, 896, 128));
  // The other fields keep their values next to a full-width expert count.
  const uint64_t sig = htSignature(kMaxHidden, true, true, kMaxTopk, true, kMaxExperts, 65536);
  EXPECT_EQ(signatureValue(kHtSignatureFields[0], sig), kMaxHidden);
  EXPECT_EQ(signatureValue(kHtSignatureFields[3], sig), kMaxTopk);
  EXPECT_EQ(signatureValue(kHtSignatureFields[4], sig), 1);
  EXPECT_EQ(signatureValue(kHtSignatureFields[6], sig), 65536);
  // Fields do not overlap.
  uint64_t used = 0;
  for (const SignatureField& f : kHtSignatureFields) {
    const uint64_t bits = ((uint64_t{1} << f.bits) - 1) << f.shift;
    EXPECT_EQ(used & bits, 0u) << f.name;
    used |= bits;
  }
}

TEST(ProtocolLimits, LlPostKeepsRowsAndSignature) {
  const uint32_t signature = llSignature(kMaxHidden, true);
  const uint32_t post = llPost(kMaxLlTokensPerRank, signature);
  EXPECT_EQ(llPostRows(post), static_cast<uint32_t>(kMaxLlTokensPerRank));
  EXPECT_EQ(llPostSignature(post), signature);
}

// A slot's LL row tag: this call's epoch and "present" (any top-k mask) is a staged row; an
// absent row, a zeroed word (a new buffer), the same value from two calls back, or the other
// half of a 32-bit-wrapped counter is not.
TEST(ProtocolLimits, LlRowStagedOnlyForThisCallsPresentRows) {
  const uint64_t epochs[] = {1, 2, 0xffffffffull, uint64_t{1} << 32, (uint64_t{1} << 32) + 5};
  for (const uint64_t epoch : epochs) {
    for (const uint32_t k_mask : {0u, 1u, 0x80u, (1u << kMaxTopk) - 1u}) {
      EXPECT_TRUE(llRowStaged(tag(epoch, llRowPresent(k_mask)), epoch)) << epoch << " " << k_mask;
      EXPECT_FALSE(llRowStaged(tag(epoch - 2, llRowPresent(k_mask)), epoch)) << epoch;
    }
    EXPECT_FALSE(llRowStaged(tag(epoch, kLlRowAbsent), epoch)) << epoch;
    EXPECT_TRUE(llRowTagReady(tag(epoch, kLlRowAbsent), epoch)) << epoch;
    EXPECT_FALSE(llRowStaged(0, epoch)) << epoch;
  }
}

// Entry tags (protocol.hpp): every local expert round-trips, and its tag is ready (never a zero
// value) only for this call.
TEST(ProtocolLimits, LlEntryTagsKeepTheLocalExpertAndAreReadyOnlyForThisCall) {
  const uint64_t epochs[] = {1, 2, 0xffffffffull, uint64_t{1} << 32, (uint64_t{1} << 32) + 5};
  for (const uint64_t epoch : epochs) {
    for (const int32_t local : {0, 1, 127, kMaxExperts - 1}) {
      const uint64_t word = tag(epoch, llEntryValue(local));
      EXPECT_NE(llEntryValue(local), 0u) << local;
      EXPECT_EQ(llEntryLocalExpert(tagValue(word)), local) << epoch << " " << local;
      EXPECT_TRUE(llRowTagReady(word, epoch)) << epoch << " " << local;
      EXPECT_FALSE(llRowTagReady(tag(epoch - 2, llEntryValue(local)), epoch)) << epoch;
    }
    EXPECT_FALSE(llRowTagReady(0, epoch)) << epoch;  // a new buffer's cleared word
  }
}

// The LL combine's line flag: never 0 (a cleared line is never ready) and different for the
// calls of one parity that follow each other (a line of call e - 2 is not ready in call e).
TEST(ProtocolLimits, LlLineFlagIsNeverZeroAndChangesBetweenCallsOfOneParity) {
  const uint64_t epochs[] = {1,
                             2,
                             3,
                             0xfffffffeull,
                             0xffffffffull,
                             uint64_t{1} << 32,
                             (uint64_t{1} << 32) + 1,
                             (uint64_t{1} << 33) + 7};
  for (const uint64_t epoch : epochs) {
    EXPECT_NE(llLineFlag(epoch), 0u) << epoch;
    EXPECT_NE(llLineFlag(epoch), llLineFlag(epoch + 2)) << epoch;
    EXPECT_NE(llLineFlag(epoch), llLineFlag(epoch + 4)) << epoch;
  }
}

TEST(ProtocolLimits, RankMaskWords) {
  EXPECT_EQ(rankMaskWords(1), 1);
  EXPECT_EQ(rankMaskWords(8), 1);
  EXPECT_EQ(rankMaskWords(32), 1);
  EXPECT_EQ(rankMaskWords(33), 2);
  EXPECT_EQ(rankMaskWords(64), 2);
  EXPECT_EQ(rankMaskWords(72), 3);
  EXPECT_EQ(kRankMaskWords, rankMaskWords(kMaxRanks));
}

TEST(ProtocolLimits, ControlRegionHoldsEveryRankAndExpert) {
  using Counts = decltype(ControlRegion::ht_counts);
  using ExpertCounts = decltype(ControlRegion::ht_expert_counts);
  EXPECT_EQ(std::extent_v<decltype(ControlRegion::barrier)>, static_cast<size_t>(kMaxRanks));
  EXPECT_EQ((std::extent_v<Counts, 1>), static_cast<size_t>(kMaxRanks));
  EXPECT_EQ((std::extent_v<Counts, 2>), static_cast<size_t>(kMaxRanks + kHtSignatureWords));
  EXPECT_EQ((std::extent_v<ExpertCounts, 1>), static_cast<size_t>(kMaxRanks));
  EXPECT_EQ((std::extent_v<ExpertCounts, 2>), static_cast<size_t>(kMaxExperts));
  // The size every rank's buffer starts with (reported in docs/design.md): about 1.3 MB at
  // 72 ranks and 1024 experts, dominated by ht_expert_counts.
  EXPECT_LT(sizeof(ControlRegion), size_t{2} << 20);
  RecordProperty("control_region_bytes", static_cast<int>(sizeof(ControlRegion)));
  std::printf("sizeof(ControlRegion) = %zu bytes\n", sizeof(ControlRegion));
}

// ht_combine_ready is shared by the rank-major and the expert-major combine (one epoch family):
// both must post it tagged. A plain epoch e would never read as reached by a tagged wait, and a
// tagged word of call e would pass a plain `>= e + 1` wait at once (the expert-major combine
// then pulled before its peers' input was ready).
TEST(ProtocolLimits, CombineReadyWordIsTaggedInEveryMode) {
  const uint64_t e = 5;
  const uint64_t tagged = tag(e, htCombineSignature(false, 0));
  EXPECT_TRUE(tagReached(tagged, e));
  EXPECT_FALSE(tagReached(tagged, e + 1));
  EXPECT_GE(tagged, e + 1) << "why a plain epoch compare is wrong on this word";
  EXPECT_FALSE(tagReached(e, e)) << "a plain epoch never satisfies a tagged wait";
  EXPECT_EQ(tagValue(tagged), htCombineSignature(false, 0));
  EXPECT_NE(htCombineSignature(false, 0), htCombineSignature(true, 8));
}

// The arrival shares (ControlRegion::ht_rows_in / ht_pulls_done): whatever a rank's grid, its
// blocks' shares sum to kArrivalShares, none is zero (a block that added nothing would not be
// waited for), and kMaxRanks sums fit a word.
TEST(ProtocolLimits, ArrivalSharesSumToOneWholeForEveryGrid) {
  for (int blocks = 1; blocks <= 1024; ++blocks) {
    uint64_t sum = 0;
    for (int b = 0; b < blocks; ++b) {
      const uint64_t share = arrivalShare(b, blocks);
      ASSERT_GT(share, 0u) << "block " << b << " of " << blocks;
      sum += share;
    }
    ASSERT_EQ(sum, kArrivalShares) << blocks << " blocks";
  }
  EXPECT_LT(static_cast<double>(kArrivalShares) * kMaxRanks, 18446744073709551616.0);
}

}  // namespace
}  // namespace epcomm::kernels
