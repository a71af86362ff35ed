# Sourced by gpu_check.sh and cuda_build_check.sh: torch finds the CUDA toolkit from `which nvcc`, and an nvcc
# wrapper outside the toolkit (e.g. /usr/local/bin/nvcc) would point it at a folder without cuda_runtime.h, so
# name the toolkit (CUDA_HOME) when it is unset and can be told.
if [ -z "${CUDA_HOME:-}" ]; then
  for d in "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /none/bin/nvcc)")")")" /usr/local/cuda; do
    [ -f "$d/include/cuda_runtime.h" ] && { export CUDA_HOME="$d"; break; }
  done
fi
