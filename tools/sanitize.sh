#!/usr/bin/env bash
# make sanitize: the cpu extension built with AddressSanitizer and
# UndefinedBehaviorSanitizer into build-sanitize/ (the in-place build is not
# touched), then the cpu backend's tests run against that copy with the
# sanitizer runtimes preloaded.  Any report aborts the run and fails it.
#
# Usage: tools/sanitize.sh PYTHON [pytest arguments, with absolute test paths...]
set -euo pipefail
source "$(dirname "$0")/absolute_python.sh" "$1"
shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$ROOT/build-sanitize
cd "$ROOT"

# The package's Python files beside the sanitized extension, in a directory of their own.
rm -rf "$OUT/pkg"
mkdir -p "$OUT/pkg"
tar -c --exclude='*.so' --exclude=__pycache__ spa_kernels | tar -x -C "$OUT/pkg"
SPA_KERNELS_SANITIZE=1 "$PYTHON" setup.py --quiet build_ext --build-temp "$OUT/temp" --build-lib "$OUT/pkg"

# The extension is instrumented but Python and torch are not, so the runtimes
# must be loaded before anything else.  Python keeps objects alive until exit
# by design: leak checking would only report those.
export LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:detect_stack_use_after_return=0
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export SPA_KERNELS_EXPECT_PACKAGE_DIR=$OUT/pkg/spa_kernels
# Run from the copy, so that it, not the source tree, is first on sys.path.
cd "$OUT/pkg"
# --capture=sys: the sanitizers write their report to file descriptor 2, which
# pytest's default capture would swallow when the process aborts.
exec "$PYTHON" -m pytest -p no:cacheprovider --capture=sys "$@"
