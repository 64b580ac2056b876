#!/usr/bin/env bash
# pnode_dist's GPU checks on a machine with an NVIDIA GPU, nvcc, an MPI with mpicc, and a
# Python that has torch, numpy, mpi4py, h5py, pytest and Cython (nothing is downloaded):
#
#     bash tools/gpu_check.sh build [OUT]   # PETSc with CUDA, float64 and float32, + petsc4py
#     bash tools/gpu_check.sh check [OUT]   # GPU tests, then the GPU benchmark (float32)
#
# `build` needs PETSc's source tarball at build/gpu-bundle/petsc-<version>.tar.gz (make
# gpu-bundle fetches it; petsc4py is built from the copy inside it). It builds both precisions at
# once into build/gpu-check/<precision> (PETSc prefix + petsc4py), skipping what is there, and
# with OUT packs each into OUT/gpu-<precision>.tar.gz.part-* (pieces under 15 MiB, for a
# transfer limit), which `check` reassembles from build/gpu-check-packs/ if build/gpu-check is
# missing. Build logs stay in build/gpu-check/logs; `check` writes its two logs to OUT.
set -euo pipefail
MODE=${1:?usage: gpu_check.sh build|check [OUT]}
case $MODE in build|check) ;; *) echo "usage: gpu_check.sh build|check [OUT]" >&2; exit 2 ;; esac
OUT=""
if [ -n "${2:-}" ]; then          # OUT relative to the caller's directory, made absolute
  mkdir -p "$2" && OUT=$(cd "$2" && pwd) || { echo "[gpu-check] cannot use OUT=$2" >&2; exit 2; }
fi
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
VERSION=$(grep -E '^petsc==' requirements.txt | cut -d= -f3)
WORK=$ROOT/build/gpu-check
LOGS=$WORK/logs
mkdir -p "$WORK" "$LOGS"
say() { echo "[gpu-check $(date +%T)] $*"; }

build_one() {      # precision
  local prec=$1 dest=$WORK/$1 src=$WORK/src-$1
  [ -f "$dest/petsc4py/lib/petsc.cfg" ] && { say "$prec: already built"; return; }
  rm -rf "$src" "$dest" && mkdir -p "$src" "$dest"
  tar xzf "$ROOT/build/gpu-bundle/petsc-$VERSION.tar.gz" -C "$src" --strip-components=1
  local cuda=${CUDA_HOME:-/usr/local/cuda}
  (cd "$src" && "$PY" ./configure --prefix="$dest/petsc" PETSC_ARCH=arch-$prec \
     --with-precision="$prec" --with-cuda=1 --with-cuda-arch="${CUDA_ARCH:-90}" \
     --with-cudac="$cuda/bin/nvcc" --with-cuda-include="[$cuda/include]" \
     --with-cuda-lib="-L$cuda/lib64 -lcufft -lcublas -lcusparse -lcusolver -lcurand -lcudart -lnvtx3interop" \
     --with-debugging=0 --with-fc=0 --with-x=0 \
     --with-shared-libraries=1 --with-cc=mpicc --with-cxx=mpicxx \
     COPTFLAGS=-O2 CXXOPTFLAGS=-O2 CUDAOPTFLAGS=-O2 > "$LOGS/configure-$prec.log" 2>&1) \
    || { tail -20 "$src/configure.log"; return 1; }
  (cd "$src" && make PETSC_DIR="$src" PETSC_ARCH=arch-$prec MAKE_NP=8 all install \
     > "$LOGS/make-$prec.log" 2>&1) || { tail -20 "$LOGS/make-$prec.log"; return 1; }
  (cd "$src/src/binding/petsc4py" && PETSC_DIR=$dest/petsc PETSC_ARCH="" \
     "$PY" -m pip install -q --no-build-isolation --no-deps --no-index --no-cache-dir --target "$dest" . \
     > "$LOGS/petsc4py-$prec.log" 2>&1) || { tail -20 "$LOGS/petsc4py-$prec.log"; return 1; }
  rm -rf "$src" "$dest/petsc/share"
  strip --strip-unneeded "$dest"/petsc/lib/libpetsc.so.* "$dest"/petsc4py/lib/*.so 2>/dev/null || true
  say "$prec: built"
}

if [ "$MODE" = build ]; then
  say "MPI: $(mpicc -show 2>&1 | head -c 200)"
  "$PY" -c "import mpi4py, torch; from mpi4py import MPI; print('mpi4py', mpi4py.__version__, \
MPI.Get_library_version().splitlines()[0], '| torch', torch.__version__, torch.cuda.is_available())"
  build_one double & b1=$!
  build_one single & b2=$!
  failed=0                         # (a failing `wait a && wait b` would not stop set -e)
  wait "$b1" || failed=1
  wait "$b2" || failed=1
  [ "$failed" = 0 ] || { say "build failed (logs in $LOGS)"; exit 1; }
  if [ -n "$OUT" ]; then
    for prec in double single; do
      tar czf - -C "$WORK" "$prec" | split -b 15m - "$OUT/gpu-$prec.tar.gz.part-"
    done
    ls -l "$OUT"
  fi
  exit 0
fi

# check
for prec in double single; do
  parts=("$ROOT"/build/gpu-check-packs/gpu-$prec.tar.gz.part-*)
  [ -d "$WORK/$prec" ] || [ ! -e "${parts[0]}" ] || cat "${parts[@]}" | tar xzf - -C "$WORK"
done
export PYTHONPATH=$WORK/double:$ROOT PNODE_PETSC_SINGLE=$WORK/single OMP_NUM_THREADS=4
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
say "GPU tests (float64 PETSc)"
REPORT=${OUT:-$WORK}
"$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_device.py 2>&1 | tee "$REPORT/gpu-tests.log"
say "GPU benchmark (float32 PETSc; targets in its output)"
PNODE_PRECISION=single "$PY" benchmarks/gpu_odenet.py --reps 3 2>&1 | tee "$REPORT/gpu-bench.log"
