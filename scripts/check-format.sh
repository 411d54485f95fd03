#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# CI: every C++/CUDA source is formatted by the committed .clang-format, and every source file
# carries an SPDX license line. Installs clang-format with apt-get when run as root and missing.
#
#   scripts/check-format.sh          check (exit 1 and list the files on a difference)
#   scripts/check-format.sh --fix    format in place
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v clang-format > /dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang-format > /dev/null
  else
    echo "check-format.sh: clang-format not found (apt-get install clang-format)" >&2
    exit 1
  fi
fi
mapfile -t sources < <(git ls-files -co --exclude-standard -- '*.cpp' '*.hpp' '*.cu' '*.cuh' '*.h')
if [ "${1:-}" = --fix ]; then
  clang-format -i "${sources[@]}"
  exit 0
fi
status=0
unformatted=$(clang-format --dry-run "${sources[@]}" 2>&1 | grep -oE '^[^:]+:[0-9]+:[0-9]+: warning' |
              cut -d: -f1 | sort -u || true)
if [ -n "$unformatted" ]; then
  echo "check-format.sh: $(clang-format --version | head -1) would change these files (scripts/check-format.sh --fix):"
  echo "$unformatted" | sed 's/^/  /'
  status=1
fi
mapfile -t licensed < <(git ls-files -co --exclude-standard -- '*.cpp' '*.hpp' '*.cu' '*.cuh' '*.h' \
                        '*.py' '*.sh' 'CMakeLists.txt' '*/CMakeLists.txt' '*.cmake' '*.in' '.ci/run')
missing=$(for f in "${licensed[@]}"; do grep -q 'SPDX-License-Identifier: Apache-2.0' "$f" || echo "$f"; done)
if [ -n "$missing" ]; then
  echo "check-format.sh: files without an 'SPDX-License-Identifier: Apache-2.0' line:"
  echo "$missing" | sed 's/^/  /'
  status=1
fi
[ "$status" = 0 ] && echo "check-format.sh: ${#sources[@]} sources formatted, every source file licensed"
exit "$status"
