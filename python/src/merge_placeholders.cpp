// SPDX-License-Identifier: Apache-2.0
// MERGE PLACEHOLDER (wt-py) -- DELETE THIS FILE (and its line in python/CMakeLists.txt) WHEN
// MERGING wt-ll: the real EpBuffer::bytesFor lives in src/ (owner wt-ll). It exists only so the
// Python module links on the wt-py branch, whose C++ does not have bytesFor yet. Leaving it in
// after the merge gives a duplicate-symbol link error, on purpose.
#include "epcomm/buffer.hpp"
#include "epcomm/error.hpp"

namespace epcomm {

BufferSizes EpBuffer::bytesFor(const BufferConfig&, int) {
  throw Error(ErrorCode::kUnsupported,
              "[epcomm] EpBuffer::bytesFor is a merge placeholder on this branch (wt-py)");
}

}  // namespace epcomm
