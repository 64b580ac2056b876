#!/usr/bin/env bash
# PETSc's configure options for CUDA (sourced by tools/setup.sh GPU=1 and tools/gpu_bundle.sh).
#   cuda_petsc_options PYTHON  -> prints the options; installs the CUDA math libraries
#   (cuBLAS, cuSPARSE, cuFFT, cuSOLVER, cuRAND, nvJitLink; pinned in requirements.txt) into
#   PYTHON's environment and links them, versioned and unversioned, in $CUDA_LINKS (default
#   build/cuda-links).
# Needs nvcc and cudart (CUDA_HOME, default /usr/local/cuda); no GPU is needed to build.
# CUDA_ARCH: the GPU's compute capability without the dot (default 90: H100/H200).
cuda_petsc_options() {
  local py=$1 root pins
  local cuda=${CUDA_HOME:-/usr/local/cuda}
  [ -x "$cuda/bin/nvcc" ] || { echo "[cuda] no nvcc in $cuda/bin: set CUDA_HOME" >&2; return 1; }
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  pins=$(grep -E '^nvidia-' "$root/requirements.txt")
  # shellcheck disable=SC2086
  "$py" -m pip install -q --disable-pip-version-check $pins >&2
  local nv
  nv=$("$py" -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13'))")
  local links=${CUDA_LINKS:-$root/build/cuda-links}
  mkdir -p "$links"
  ln -sf "$nv"/lib/*.so.* "$links/"     # the versioned names the libraries ask for each other by
  for lib in cublas cublasLt cusparse cufft cusolver curand nvJitLink; do
    local so
    so=$(ls "$nv"/lib/lib$lib.so.* 2>/dev/null | head -1)
    [ -n "$so" ] || { echo "[cuda] lib$lib not found in $nv/lib" >&2; return 1; }
    ln -sf "$so" "$links/lib$lib.so"
  done
  echo "--with-cuda=1 --with-cuda-arch=${CUDA_ARCH:-90} --with-cudac=$cuda/bin/nvcc" \
       "--with-cuda-include=[$cuda/include,$nv/include]" \
       "--with-cuda-lib=[-L$links,-lcufft,-lcublas,-lcusparse,-lcusolver,-lcurand,-L$cuda/lib64,-lcudart,-lnvtx3interop]"
}
