#!/usr/bin/env bash
# Build a relocatable CUDA-enabled PETSc + petsc4py on a machine WITHOUT a GPU (nvcc and cudart
# are enough), for GPU nodes that lack build tools or time:
#     make gpu-bundle [GPU_PYTHON=3.12] [GPU_PREFIX=/opt/pnode-gpu] [CUDA_ARCH=90] [GPU_MPI=none]
#                     [GPU_PRECISION=double|single]
# Output: dist/pnode-gpu-petsc<version>-cuda-<precision>-py<python>.tar.gz, holding PREFIX
# (PETSc, stripped,
# without its share/ folder), the petsc4py wheel for that Python, and env.sh. On the GPU node:
#     tar xzf pnode-gpu-...tar.gz -C /          # PETSc must sit at the same PREFIX
#     source PREFIX/env.sh                       # PETSC_DIR, LD_LIBRARY_PATH (torch's CUDA libs)
#     pip install PREFIX/petsc4py-*.whl
#     python -c "import torch, petsc4py"         # import torch first: it loads the CUDA libraries
# GPU_MPI=none builds PETSc without MPI (one rank per process); for multi-rank runs point it at
# the GPU machine's MPI installation (a folder with bin/mpicc) and install mpi4py there.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYVER=${GPU_PYTHON:-3.12}
PREFIX=${GPU_PREFIX:-/opt/pnode-gpu}
MPI=${GPU_MPI:-none}
PRECISION=${GPU_PRECISION:-double}
case $PRECISION in double|single) ;; *) echo "[gpu-bundle] GPU_PRECISION: double or single" >&2; exit 2;; esac
case $PREFIX in
  /*) ;;
  *) echo "[gpu-bundle] GPU_PREFIX must be an absolute path (got '$PREFIX')" >&2; exit 2 ;;
esac
PREFIX=${PREFIX%/}
[ -n "$PREFIX" ] || { echo "[gpu-bundle] GPU_PREFIX must not be /" >&2; exit 2; }
# The bundle packs all of PREFIX, so PREFIX must be this script's own: new, empty, marked by an
# earlier run, or holding only what a PETSc install creates (an existing /usr/local, say, is
# refused rather than packed).
MARK=$PREFIX/.pnode-gpu-bundle
if [ -e "$PREFIX" ] && [ ! -d "$PREFIX" ]; then
  echo "[gpu-bundle] GPU_PREFIX $PREFIX is not a directory" >&2; exit 2
fi
if [ -d "$PREFIX" ] && [ ! -f "$MARK" ]; then
  for entry in "$PREFIX"/* "$PREFIX"/.[!.]*; do
    [ -e "$entry" ] || continue
    case ${entry##*/} in
      include|lib|share|bin|env.sh|petsc4py-*.whl) ;;
      *) echo "[gpu-bundle] GPU_PREFIX $PREFIX holds '${entry##*/}', which a PETSc install" \
              "does not create: choose a new or empty directory for the bundle" >&2; exit 2 ;;
    esac
  done
  if [ -n "$(ls -A "$PREFIX")" ] && [ ! -f "$PREFIX/include/petscconf.h" ]; then
    echo "[gpu-bundle] GPU_PREFIX $PREFIX is neither empty nor a PETSc install: choose a new" \
         "or empty directory for the bundle" >&2; exit 2
  fi
fi
WORK=$ROOT/build/gpu-bundle
STAGE=$WORK/stage              # the bundle's tree, assembled here: PREFIX itself is never pruned
say() { echo "[gpu-bundle] $*"; }
pin() { grep -E "^$1==" requirements.txt | head -1 | cut -d= -f3; }
source tools/cuda_petsc.sh

# 1. The target Python (pyenv's, or python<version> on PATH) and a build environment.
PYTHON=$(ls -d "$(pyenv root 2>/dev/null || echo /nonexistent)"/versions/$PYVER*/bin/python 2>/dev/null | tail -1)
[ -n "$PYTHON" ] || PYTHON=$(command -v "python$PYVER" || true)
[ -n "$PYTHON" ] || { echo "[gpu-bundle] no Python $PYVER found (pyenv install $PYVER)" >&2; exit 2; }
mkdir -p "$WORK" dist
if [ ! -x "$WORK/venv/bin/python" ]; then
  say "build environment with $PYTHON"
  "$PYTHON" -m venv "$WORK/venv"
fi
VPY=$WORK/venv/bin/python
"$VPY" -m pip install -q --disable-pip-version-check "numpy==$(pin numpy)" "Cython==$(pin Cython)" \
  "setuptools==$(pin setuptools)" "wheel==$(pin wheel)"
OPTIONS=$(CUDA_LINKS=$WORK/cuda-links cuda_petsc_options "$VPY")

# 2. PETSc from its source release, installed at PREFIX.
VERSION=$(pin petsc)
built_as() {       # does PREFIX hold a CUDA PETSc of this precision?
  local conf=$PREFIX/include/petscconf.h single=0
  grep -qE '^#define PETSC_HAVE_CUDA 1$' "$conf" 2>/dev/null || return 1
  grep -qE '^#define PETSC_USE_REAL_SINGLE 1$' "$conf" && single=1
  [ "$single" = "$([ "$PRECISION" = single ] && echo 1 || echo 0)" ]
}
if ! built_as; then
  if [ ! -d "$WORK/petsc-$VERSION" ]; then
    say "fetching PETSc $VERSION's source"
    "$VPY" -m pip download -q --no-deps --no-binary :all: -d "$WORK" "petsc==$VERSION"
    tar xzf "$WORK/petsc-$VERSION.tar.gz" -C "$WORK"
  fi
  mkdir -p "$PREFIX" && touch "$MARK" \
    || { echo "[gpu-bundle] cannot write to GPU_PREFIX $PREFIX" >&2; exit 2; }
  if [ "$MPI" = none ]; then mpi_opts="--with-mpi=0"; else mpi_opts="--with-mpi-dir=$MPI"; fi
  say "configuring ($PRECISION, CUDA arch ${CUDA_ARCH:-90}, MPI: $MPI, prefix $PREFIX)"
  # shellcheck disable=SC2086
  (cd "$WORK/petsc-$VERSION" && "$VPY" ./configure --prefix="$PREFIX" PETSC_ARCH=arch-gpu \
     --with-debugging=0 --with-fc=0 --with-x=0 --with-shared-libraries=1 $mpi_opts $OPTIONS \
     --with-precision="$PRECISION" \
     COPTFLAGS=-O2 CXXOPTFLAGS=-O2 CUDAOPTFLAGS=-O2 > "$WORK/configure.log" 2>&1) \
    || { tail -30 "$WORK/petsc-$VERSION/configure.log" >&2; exit 1; }
  say "building PETSc (about 5 minutes on 2 cores)"
  (cd "$WORK/petsc-$VERSION" && make PETSC_DIR="$PWD" PETSC_ARCH=arch-gpu all install \
     > "$WORK/make.log" 2>&1) || { tail -30 "$WORK/make.log" >&2; exit 1; }
fi

# 3. petsc4py for the target Python, against that PETSc.
WHEELS=$WORK/wheels-$PRECISION
WHEEL=$(ls "$WHEELS"/petsc4py-"$(pin petsc4py)"-*.whl 2>/dev/null | head -1 || true)
if [ -z "$WHEEL" ] || [ "$WHEEL" -ot "$PREFIX/include/petscconf.h" ]; then
  say "building petsc4py $(pin petsc4py) for Python $PYVER (about 4 minutes)"
  rm -rf "$WHEELS"
  # --no-cache-dir: pip would otherwise reuse a wheel it built against another PETSc.
  PETSC_DIR=$PREFIX PETSC_ARCH="" "$VPY" -m pip wheel -q --no-build-isolation --no-deps \
    --no-cache-dir --no-binary petsc4py -w "$WHEELS" "petsc4py==$(pin petsc4py)"
  WHEEL=$(ls "$WHEELS"/petsc4py-*.whl | head -1)
fi

# 4. The bundle, staged in $STAGE (this script's own folder: PREFIX is copied, not changed):
# stripped libraries, no share/, the wheel and an environment script.
case $STAGE in
  "$ROOT"/build/gpu-bundle/stage) ;;
  *) echo "[gpu-bundle] refusing to stage outside build/gpu-bundle: $STAGE" >&2; exit 1 ;;
esac
rm -rf "$STAGE"
mkdir -p "$STAGE$PREFIX"
cp -a "$PREFIX"/. "$STAGE$PREFIX"/
rm -rf "$STAGE$PREFIX/share" "$STAGE$PREFIX"/petsc4py-*.whl "$STAGE$MARK"
strip --strip-unneeded "$STAGE$PREFIX"/lib/libpetsc.so.* 2>/dev/null || true
cp "$WHEEL" "$STAGE$PREFIX/"
cat > "$STAGE$PREFIX/env.sh" <<ENV
# Source on the GPU node (bash): PETSc at $PREFIX and the CUDA libraries torch ships.
export PETSC_DIR=$PREFIX PETSC_ARCH=
nv=\$(python -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'lib'))" 2>/dev/null)
export LD_LIBRARY_PATH=$PREFIX/lib\${nv:+:\$nv}:\${CUDA_HOME:-/usr/local/cuda}/lib64\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
ENV
OUT=dist/pnode-gpu-petsc$VERSION-cuda-$PRECISION-py$PYVER.tar.gz
tar czf "$OUT" -C "$STAGE" "${PREFIX#/}"
say "wrote $OUT ($(du -h "$OUT" | cut -f1)); unpack with: tar xzf $(basename "$OUT") -C /"
