// SPDX-License-Identifier: Apache-2.0
// The error hierarchy and the internal check macros: codes, names, catching by base class, and
// messages that name the call or argument, the limit, file:line and the rank.
#include <cuda_runtime_api.h>
#include <errno.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <string>
#include <type_traits>

#include "check.hpp"
#include "epcomm/error.hpp"

namespace epcomm {
namespace {

::testing::AssertionResult contains(const std::string& text, const std::string& part) {
  if (text.find(part) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "\"" << text << "\" does not contain \"" << part << "\"";
}

// Restores the process rank so tests do not leak it into each other.
class ProcessRankGuard {
 public:
  explicit ProcessRankGuard(int rank) : saved_(detail::processRank()) {
    detail::setProcessRank(rank);
  }
  ~ProcessRankGuard() { detail::setProcessRank(saved_); }

 private:
  int saved_;
};

// Runs `fn`, expects it to throw E, and returns the exception for further checks.
template <typename E, typename Fn>
E expectThrow(Fn&& fn) {
  try {
    fn();
  } catch (const E& e) {
    return e;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "threw the wrong type: " << e.what();
    throw;
  }
  ADD_FAILURE() << "did not throw";
  throw std::logic_error("no exception");
}

TEST(ErrorCodes, EveryCodeHasAStableName) {
  const std::pair<ErrorCode, const char*> expected[] = {
      {ErrorCode::kInternal, "Internal"},
      {ErrorCode::kCuda, "Cuda"},
      {ErrorCode::kDriver, "Driver"},
      {ErrorCode::kMpi, "Mpi"},
      {ErrorCode::kSystem, "System"},
      {ErrorCode::kTimeout, "Timeout"},
      {ErrorCode::kInvalidArgument, "InvalidArgument"},
      {ErrorCode::kUnsupported, "Unsupported"},
      {ErrorCode::kRemote, "Remote"},
      {ErrorCode::kBroken, "Broken"},
  };
  for (const auto& [code, name] : expected) EXPECT_STREQ(errorCodeName(code), name);
  EXPECT_STREQ(errorCodeName(static_cast<ErrorCode>(9999)), "Unknown");
}

TEST(ErrorHierarchy, SubclassesCarryCodeAndStatus) {
  static_assert(std::is_base_of<std::runtime_error, Error>::value, "Error is a runtime_error");
  const CudaError cuda(2, "cuda");
  EXPECT_EQ(cuda.code(), ErrorCode::kCuda);
  EXPECT_EQ(cuda.status(), 2);
  const DriverError driver(800, "driver");
  EXPECT_EQ(driver.code(), ErrorCode::kDriver);
  EXPECT_EQ(driver.status(), 800);
  const MpiError mpi(5, "mpi");
  EXPECT_EQ(mpi.code(), ErrorCode::kMpi);
  EXPECT_EQ(mpi.status(), 5);
  const SystemError system(EBADF, "system");
  EXPECT_EQ(system.code(), ErrorCode::kSystem);
  EXPECT_EQ(system.errnoValue(), EBADF);
  const TimeoutError timeout(3, "timeout");
  EXPECT_EQ(timeout.code(), ErrorCode::kTimeout);
  EXPECT_EQ(timeout.peer(), 3);
  const InvalidArgument invalid("invalid");
  EXPECT_EQ(invalid.code(), ErrorCode::kInvalidArgument);
  EXPECT_STREQ(invalid.what(), "invalid");
  const Error plain(ErrorCode::kBroken, "broken");
  EXPECT_EQ(plain.code(), ErrorCode::kBroken);
}

TEST(ErrorHierarchy, EverySubclassIsCaughtAsError) {
  auto codeWhenCaught = [](auto&& thrower) {
    try {
      thrower();
    } catch (const Error& e) {
      return e.code();
    }
    return ErrorCode::kInternal;
  };
  EXPECT_EQ(codeWhenCaught([] { throw CudaError(1, "x"); }), ErrorCode::kCuda);
  EXPECT_EQ(codeWhenCaught([] { throw DriverError(1, "x"); }), ErrorCode::kDriver);
  EXPECT_EQ(codeWhenCaught([] { throw MpiError(1, "x"); }), ErrorCode::kMpi);
  EXPECT_EQ(codeWhenCaught([] { throw SystemError(1, "x"); }), ErrorCode::kSystem);
  EXPECT_EQ(codeWhenCaught([] { throw TimeoutError(1, "x"); }), ErrorCode::kTimeout);
  EXPECT_EQ(codeWhenCaught([] { throw InvalidArgument("x"); }), ErrorCode::kInvalidArgument);
  EXPECT_THROW(throw TimeoutError(0, "x"), std::runtime_error);
}

TEST(CheckMacros, CheckThrowsInternalWithMessageAndLocation) {
  ProcessRankGuard rank(-1);
  const int value = 42;
  const int line = __LINE__ + 1;
  auto e = expectThrow<Error>([&] { EPCOMM_CHECK(value < 10, "value is " << value); });
  EXPECT_EQ(e.code(), ErrorCode::kInternal);
  const std::string what = e.what();
  EXPECT_TRUE(contains(what, "value is 42"));
  EXPECT_TRUE(contains(what, "unit/test_errors.cpp:" + std::to_string(line)));
  EXPECT_TRUE(contains(what, "[epcomm] "));  // no rank known yet
  EXPECT_NO_THROW(EPCOMM_CHECK(value == 42, "never built"));
}

TEST(CheckMacros, CheckCodeThrowsTheMatchingSubclass) {
  EXPECT_THROW(EPCOMM_CHECK_CODE(false, ErrorCode::kInvalidArgument, "x"), InvalidArgument);
  auto timeout =
      expectThrow<TimeoutError>([] { EPCOMM_CHECK_CODE(false, ErrorCode::kTimeout, "late"); });
  EXPECT_EQ(timeout.peer(), -1);
  auto remote = expectThrow<Error>([] { EPCOMM_CHECK_CODE(false, ErrorCode::kRemote, "peer"); });
  EXPECT_EQ(remote.code(), ErrorCode::kRemote);
}

TEST(CheckMacros, ArgCheckNamesArgumentValueLimitAndLocation) {
  const int hidden = 100;
  const int line = __LINE__ + 2;
  auto e = expectThrow<InvalidArgument>(
      [&] { EPCOMM_ARG_CHECK(hidden % 128 == 0, "hidden", hidden, "a multiple of " << 128); });
  EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
  const std::string what = e.what();
  EXPECT_TRUE(contains(what, "hidden = 100"));
  EXPECT_TRUE(contains(what, "a multiple of 128"));
  EXPECT_TRUE(contains(what, "test_errors.cpp:" + std::to_string(line)));
}

TEST(CheckMacros, CudaCheckNamesTheFailingCall) {
  // Fails everywhere: an invalid ordinal with a driver, "no driver" without one.
  auto e = expectThrow<CudaError>([] { EPCOMM_CUDA_CHECK(cudaSetDevice(-1)); });
  EXPECT_EQ(e.code(), ErrorCode::kCuda);
  EXPECT_NE(e.status(), static_cast<int>(cudaSuccess));
  const std::string what = e.what();
  EXPECT_TRUE(contains(what, "cudaSetDevice(-1) failed"));
  EXPECT_TRUE(contains(what, cudaGetErrorName(static_cast<cudaError_t>(e.status()))));
  EXPECT_TRUE(contains(what, "test_errors.cpp:"));
  EXPECT_NO_THROW(EPCOMM_CUDA_CHECK(cudaSuccess));
}

TEST(CheckMacros, CudaLogOnlyPrints) {
  ::testing::internal::CaptureStderr();
  EXPECT_NO_THROW(EPCOMM_CUDA_LOG(cudaSetDevice(-1)));
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_TRUE(contains(err, "warning: cudaSetDevice(-1) failed"));
}

TEST(CheckMacros, SysCheckCarriesErrno) {
  auto e = expectThrow<SystemError>([] { EPCOMM_SYS_CHECK(::close(-1)); });
  EXPECT_EQ(e.errnoValue(), EBADF);
  const std::string what = e.what();
  EXPECT_TRUE(contains(what, "::close(-1) failed"));
  EXPECT_TRUE(contains(what, "errno " + std::to_string(EBADF)));
}

TEST(CheckMacros, DriverErrorsAreNamedWithoutADriver) {
  auto e = expectThrow<DriverError>(
      [] { detail::throwDriver(800, "cuMemCreate(&handle, ...)", __FILE__, __LINE__); });
  EXPECT_EQ(e.status(), 800);
  const std::string what = e.what();
  EXPECT_TRUE(contains(what, "cuMemCreate(&handle, ...) failed"));
  EXPECT_TRUE(contains(what, "800"));
}

TEST(CheckMacros, MessagesNameTheProcessRank) {
  ProcessRankGuard rank(3);
  EXPECT_EQ(detail::processRank(), 3);
  auto e = expectThrow<Error>([] { EPCOMM_CHECK(false, "boom"); });
  EXPECT_TRUE(contains(std::string(e.what()), "[epcomm rank 3] boom"));
  const std::string formatted = detail::formatMessage("what", "/a/b/src/memory/x.cpp", 7);
  EXPECT_EQ(formatted, "[epcomm rank 3] what (memory/x.cpp:7)");
}

TEST(CheckMacros, FormatMessageKeepsShortPathsWhole) {
  ProcessRankGuard rank(-1);
  EXPECT_EQ(detail::formatMessage("w", "x.cpp", 1), "[epcomm] w (x.cpp:1)");
  EXPECT_EQ(detail::formatMessage("w", "/x.cpp", 2), "[epcomm] w (/x.cpp:2)");
}

TEST(CheckMacros, LaunchCheckNamesTheKernel) {
  // Any failed runtime call leaves an error for cudaGetLastError, GPU or not.
  (void)cudaSetDevice(-1);
  const CudaError e = expectThrow<CudaError>([] { EPCOMM_LAUNCH_CHECK(htDispatchKernel); });
  EXPECT_TRUE(contains(e.what(), "launch of htDispatchKernel failed"));
}

}  // namespace
}  // namespace epcomm
