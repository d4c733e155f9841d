#!/usr/bin/env bash
# make test-wheel: the package as a user gets it.  The sdist is made and checked
# for the files the build needs; the wheel is built from the tree with pip (which
# reuses the objects of the in-place build in build/, so only the link is new),
# installed into a venv of its own that has torch but not the source tree, and
# a smoke subset of the tests runs from a directory outside the tree.
# tests/conftest.py then checks that spa_kernels and its compiled extension come
# from that venv's site-packages.
#
# Usage: tools/test_wheel.sh BUILD_PYTHON WHEEL_VENV [pytest arguments, paths under tests/...]
# BUILD_PYTHON has torch, setuptools and ninja; WHEEL_VENV is created on first use
# (torch 2.13.0 and the test dependencies) and reused after.
set -euo pipefail
source "$(dirname "$0")/absolute_python.sh" "$1"
VENV=$(mkdir -p "$2" && cd "$2" && pwd)
shift 2
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIST=$ROOT/build-wheel/dist
cd "$ROOT"

rm -rf "$DIST"
"$PYTHON" setup.py --quiet sdist --dist-dir "$DIST"
SDIST=$(ls "$DIST"/spa_kernels-*.tar.gz)
LISTING=$(tar -tzf "$SDIST")
for required in csrc/cpu/* setup.py pyproject.toml MANIFEST.in; do
    grep -q "/$required\$" <<<"$LISTING" || { echo "sdist lacks $required" >&2; exit 1; }
done
"$PYTHON" -m pip wheel --quiet --no-build-isolation --no-deps --wheel-dir "$DIST" "$ROOT"
WHEEL=$(ls "$DIST"/spa_kernels-*.whl)
"$PYTHON" - "$WHEEL" <<'CHECK'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
if not any(n.startswith("spa_kernels/_C.") and n.endswith(".so") for n in names):
    sys.exit(f"{sys.argv[1]} has no compiled extension")
CHECK

if [ ! -f "$VENV/.installed" ]; then
    "$PYTHON" -m venv --clear "$VENV"
    "$VENV/bin/python" -m pip install --quiet torch==2.13.0 numpy pytest pytest-timeout hypothesis
    touch "$VENV/.installed"
fi
"$VENV/bin/python" -m pip install --quiet --force-reinstall --no-deps "$WHEEL"

RUN_DIR=$(mktemp -d)
trap 'rm -rf "$RUN_DIR"' EXIT
cp -r "$ROOT/tests" "$RUN_DIR/tests"
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')
cd "$RUN_DIR"
SPA_KERNELS_EXPECT_PACKAGE_DIR=$SITE/spa_kernels "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
