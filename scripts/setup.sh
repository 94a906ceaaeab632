#!/usr/bin/env bash
# One-command set-up (make setup): .venv with pinned packages, our ROS 2 messages built with
# rosidl into it, and ciae_core/ciae_ros installed. Idempotent: each step is skipped when the
# inputs it depends on (requirements, msg/, sources) have not changed since it last ran.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${CIAE_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
STAMPS="$VENV/.ciae-stamps"
log() { echo "[setup] $*"; }
hash_of() { cat "$@" | sha256sum | cut -c1-16; }
stamp_ok() { [ -f "$STAMPS/$1" ] && [ "$(cat "$STAMPS/$1")" = "$2" ]; }
stamp_set() { mkdir -p "$STAMPS"; echo "$2" > "$STAMPS/$1"; }

# 1. System tools the message build needs.
need=()
command -v cmake >/dev/null || need+=(cmake)
command -v g++ >/dev/null || need+=(g++)
command -v make >/dev/null || need+=(make)
if [ ${#need[@]} -gt 0 ]; then
  log "installing Debian packages: ${need[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

# 2. Virtual environment with pinned packages.
if [ ! -x "$PY" ]; then
  log "creating $VENV"
  python3 -m venv "$VENV"
fi
req_hash=$(hash_of requirements.txt)
if ! stamp_ok requirements "$req_hash"; then
  log "installing pinned packages (a few minutes on a fresh machine)"
  "$PY" -m pip install -q --disable-pip-version-check --upgrade pip
  "$PY" -m pip install -q --disable-pip-version-check -r requirements.txt
  stamp_set requirements "$req_hash"
  rm -f "$STAMPS/msgs"
fi

# 3. Our messages (msg/*.msg) with rosidl, installed into the venv (cmake route; the same
#    CMakeLists.txt builds with colcon on a ROS 2 install).
src_hash=$(hash_of CMakeLists.txt package.xml setup.py msg/*.msg $(git ls-files -co --exclude-standard ciae_ros ciae_core scripts | grep -v __pycache__ | sort))
if ! stamp_ok msgs "$src_hash"; then
  log "building msg/ with rosidl into the venv"
  # The ROS wheels' exported CMake files name the wheel build container's Python and numpy
  # include dirs; point them at this interpreter's (see the README, "How the venv is built").
  py_inc=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  np_inc=$("$PY" -c 'import numpy; print(numpy.get_include())')
  { grep -rlE '/opt/python/cp311-cp311' "$VENV/share" --include='*.cmake' 2>/dev/null || true; } | while read -r f; do
    sed -i -e "s#/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include#$np_inc#g" \
           -e "s#/opt/python/cp311-cp311/include/python3.11#$py_inc#g" "$f"
  done
  BUILD="$ROOT/build/venv"
  mkdir -p "$BUILD"
  (
    cd "$BUILD"
    export AMENT_PREFIX_PATH="$VENV"
    cmake "$ROOT" -DCMAKE_PREFIX_PATH="$VENV" -DCMAKE_INSTALL_PREFIX="$VENV" \
      -DPython3_EXECUTABLE="$PY" -DBUILD_TESTING=OFF -DCMAKE_BUILD_TYPE=Release >cmake.log 2>&1 \
      || { tail -30 cmake.log; exit 1; }
    make -j"$(nproc)" >make.log 2>&1 || { tail -40 make.log; exit 1; }
    make install >install.log 2>&1 || { tail -20 install.log; exit 1; }
  )
  # 4. Console scripts and package metadata (pip route, same sources).
  "$PY" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation "$ROOT"
  # pip's copy of ciae_ros/ sits beside rosidl's msg/ and typesupport libraries; re-run the
  # cmake install so the generated files are certainly present.
  (cd "$BUILD" && make install >install.log 2>&1)
  stamp_set msgs "$src_hash"
fi

"$PY" - <<'PYEOF'
import ciae_core, ciae_ros.msg as m
assert hasattr(m, "PanopticSegments"), "ciae_ros.msg.PanopticSegments missing after the build"
PYEOF
log "ready: $VENV (activate with: source $VENV/bin/activate)"
