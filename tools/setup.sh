#!/usr/bin/env bash
# Idempotent set-up of pnode_dist's environment in .venv (Debian 12, run as root or with sudo).
# Each step checks whether its result is already there and skips itself if so; a second run
# takes seconds. Versions come from requirements.txt only.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=$ROOT/.venv
PY=$VENV/bin/python
PINS=$ROOT/requirements.txt
pin() { grep -E "^$1==" "$PINS" | head -1; }
say() { echo "[setup] $*"; }

# A long build (PETSc, petsc4py: minutes) with its output in a log: every 30 s one line with the
# elapsed time and the build's latest stage (never minutes of silence); the log's end if it fails.
long_build() {
  local label=$1 log start pid stage
  shift
  log=$(mktemp /tmp/pnode-setup.XXXXXX)
  start=$SECONDS
  set -m                           # job control: the build gets its own process group
  "$@" -vv </dev/null >"$log" 2>&1 &
  pid=$!
  set +m
  # The build must not outlive this script (Ctrl-C, or a failure of the script itself).
  trap 'kill -- -"$pid" 2>/dev/null' EXIT
  while kill -0 "$pid" 2>/dev/null; do
    for _ in 1 2 3 4 5 6; do kill -0 "$pid" 2>/dev/null && sleep 5; done
    if kill -0 "$pid" 2>/dev/null; then
      # (|| true: before its first stage line the log matches nothing, and under pipefail
      # that would end the whole set-up while the build went on alone.)
      stage=$(grep -aE "TESTING: |Configuring|^ *(CC|CXX|CLINKER|FC) |Compiling|Cythoniz|building '|Installing|Copying" \
                "$log" 2>/dev/null | tail -1 | tr -s ' ' | cut -c1-90 || true)
      say "$label: $(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s${stage:+ ($stage)}"
    fi
  done
  trap - EXIT
  if ! wait "$pid"; then
    tail -40 "$log" >&2
    echo "[setup] $label failed (whole log: $log)" >&2
    return 1
  fi
  say "$label: done in $(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s"
  rm -f "$log"
}

# 1. Debian packages: MPICH, LAPACK/BLAS, patchelf (PETSc's wheel install uses it), the
#    Fashion-MNIST data set (IDX files under /usr/share/datasets/fashion-mnist) for the apps, and
#    SLURM + munge for the job-script tests (they start their own daemons; none is enabled here),
#    iproute2 and util-linux (ip, nsenter, unshare) for the multi-node tests' namespaces.
DEB_PKGS="mpich libmpich-dev liblapack-dev libblas-dev patchelf dataset-fashion-mnist
          slurmctld slurmd slurm-client munge iproute2 util-linux"
missing=""
for p in $DEB_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  say "installing Debian packages:$missing"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi

# 2. Virtual environment and build tools.
if [ ! -x "$PY" ]; then
  say "creating $VENV"
  python3 -m venv "$VENV"
fi
pipi() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
have() { "$PY" - "$1" <<'PYEOF' 2>/dev/null
import sys
from importlib.metadata import version
name, _, want = sys.argv[1].partition("==")
sys.exit(0 if version(name).split("+")[0] == want else 1)  # 2.13.0+cpu satisfies 2.13.0
PYEOF
}
for p in pip setuptools wheel Cython numpy; do
  have "$(pin $p)" || { say "installing $(pin $p)"; pipi "$(pin $p)"; }
done

# 3. mpi4py from source (its binary wheel looks for another MPI's libmpi.so.12).
if ! have "$(pin mpi4py)"; then
  say "building $(pin mpi4py) against $(command -v mpicc)"
  pipi --no-binary=mpi4py --no-cache-dir "$(pin mpi4py)"
fi

# 4. PETSc (about 6 min on 2 cores), then petsc4py against that same PETSc (about 4 min).
#    GPU=1: with CUDA (nvcc needed; CUDA_ARCH, default 90), the CUDA math libraries from PyPI.
petsc_dir() { "$PY" -c "import petsc; print(petsc.get_petsc_dir())" 2>/dev/null; }
petsc_ok() {
  have "$(pin petsc)" || return 1
  local has_cuda=0
  grep -qE '^#define PETSC_HAVE_CUDA 1$' "$(petsc_dir)/include/petscconf.h" 2>/dev/null \
    && has_cuda=1
  [ "$has_cuda" = "${GPU:-0}" ]
}
configure_options() {
  if [ "${GPU:-0}" = 1 ]; then
    local cuda
    source "$ROOT/tools/cuda_petsc.sh"
    cuda=$(cuda_petsc_options "$PY") || return 1
    echo "--with-fc=0 --with-x=0 --with-debugging=0 $cuda"
  else
    echo "--with-fc=0 --with-x=0 --with-debugging=0 --with-cuda=0"
  fi
}
if ! petsc_ok; then
  options=$(configure_options)
  say "building $(pin petsc) (about 6 minutes on 2 cores; GPU=${GPU:-0})"
  PETSC_CONFIGURE_OPTIONS="$options" long_build "building $(pin petsc)" \
    pipi --no-build-isolation --no-cache-dir --force-reinstall --no-deps "$(pin petsc)"
  rebuilt_petsc=1
fi
PETSC_DIR=$(petsc_dir)
petsc4py_ok() {
  have "$(pin petsc4py)" || return 1
  local so
  so=$(ls "$VENV"/lib/python3*/site-packages/petsc4py/lib/PETSc*.so 2>/dev/null | head -1)
  [ -n "$so" ] || return 1
  # The extension must link this venv's PETSc, not one from a cached wheel of another venv.
  readelf -d "$so" | grep -E "RUNPATH|RPATH" | grep -q "$PETSC_DIR" || return 1
}
if [ -n "${rebuilt_petsc:-}" ] || ! petsc4py_ok; then
  say "building $(pin petsc4py) against $PETSC_DIR (about 4 minutes)"
  PETSC_DIR=$PETSC_DIR PETSC_ARCH="" long_build "building $(pin petsc4py)" \
    pipi --no-build-isolation --no-cache-dir --force-reinstall --no-deps "$(pin petsc4py)"
  petsc4py_ok || { echo "[setup] petsc4py does not link $PETSC_DIR" >&2; exit 1; }
fi

# 4b. The same PETSc + petsc4py in single precision, installed apart (.venv/petsc-single):
#     PNODE_PRECISION=single selects it at run time, for float32 models without casts. Built
#     only with BUILD_SINGLE=1 (`make setup-single`, which `make test` runs): the main job
#     needs only the double-precision build.
SINGLE=$VENV/petsc-single
petsc_version=$(pin petsc | cut -d= -f3)
petsc4py_version=$(pin petsc4py | cut -d= -f3)
single_ok() {
  local conf=$SINGLE/petsc/include/petscconf.h so has_cuda=0
  [ -d "$SINGLE/petsc-$petsc_version.dist-info" ] && [ -d "$SINGLE/petsc4py-$petsc4py_version.dist-info" ] \
    && grep -qE '^#define PETSC_USE_REAL_SINGLE 1$' "$conf" 2>/dev/null || return 1
  grep -qE '^#define PETSC_HAVE_CUDA 1$' "$conf" && has_cuda=1
  [ "$has_cuda" = "${GPU:-0}" ] || return 1
  so=$(ls "$SINGLE"/petsc4py/lib/PETSc*.so 2>/dev/null | head -1)
  [ -n "$so" ] && readelf -d "$so" | grep -E "RUNPATH|RPATH" | grep -q "$SINGLE/petsc"
}
if [ "${BUILD_SINGLE:-0}" = 1 ] && ! single_ok; then
  say "building single-precision $(pin petsc) + petsc4py in $SINGLE (about 10 minutes)"
  rm -rf "$SINGLE"
  options=$(configure_options)
  PETSC_CONFIGURE_OPTIONS="$options --with-precision=single" \
    long_build "building single-precision $(pin petsc)" \
    pipi --no-build-isolation --no-cache-dir --no-deps --target "$SINGLE" "$(pin petsc)"
  PETSC_DIR=$SINGLE/petsc PETSC_ARCH="" long_build "building single-precision $(pin petsc4py)" \
    pipi --no-build-isolation --no-cache-dir --no-deps --target "$SINGLE" "$(pin petsc4py)"
  single_ok || { echo "[setup] the single-precision petsc4py in $SINGLE is incomplete" >&2; exit 1; }
fi

# 5. torch (exact pin: a range could pull a multi-GB CUDA build) and the rest.
for p in torch h5py scikit-learn scipy tqdm matplotlib pytest torchdiffeq mlxtend; do
  have "$(pin $p)" || { say "installing $(pin $p)"; pipi "$(pin $p)"; }
done

# 6. pnode_dist itself, editable, with its console scripts.
if ! (cd / && "$PY" -c "import pnode_dist, sys; sys.exit(0 if pnode_dist.__file__.startswith('$ROOT/') else 1)") 2>/dev/null \
   || [ ! -x "$VENV/bin/pnode-inspect" ]; then
  say "installing pnode_dist (editable)"
  pipi --no-build-isolation --no-deps -e "$ROOT"
fi
# 7. The documentation's tools, only with DOCS=1 (`make setup-docs`, which `make docs` and
#    `make test` run): Sphinx and MyST from PyPI, and Debian's Chromium for the tests that open
#    the built site in a headless browser.
if [ "${DOCS:-0}" = 1 ]; then
  for p in sphinx myst-parser; do
    have "$(pin $p)" || { say "installing $(pin $p)"; pipi "$(pin $p)"; }
  done
  if ! dpkg -s chromium >/dev/null 2>&1; then
    say "installing Debian's chromium (headless browser for the docs' tests)"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
  fi
fi
say "ready: $VENV"
