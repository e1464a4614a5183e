#!/usr/bin/env bash
# Compile-check the CUDA build's sources on a machine without a GPU or a CUDA torch: nvcc builds the
# kernels (csrc/latent_kernels.cu) and the host compiler builds the CUDA-only C++ (nccl_comm.cpp, and
# latent_ops.cpp / bindings.cpp with TETRI_WITH_CUDA) against the installed torch's headers, nvcc's
# CUDA headers and an NCCL header. Nothing is linked (a CPU torch has no libc10_cuda to link).
#
#   NCCL_INCLUDE=/path/to/nvidia/nccl/include csrc/cuda_compile_check.sh [python]
#
# NCCL_INCLUDE defaults to the nvidia-nccl-cu* package next to torch. Objects go to a temp dir.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
TORCH_INC=$("$PY" -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))")
PY_INC=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
NCCL_INCLUDE=${NCCL_INCLUDE:-$("$PY" -c "import os, torch; print(os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), 'nvidia', 'nccl', 'include'))")}
[ -f "$NCCL_INCLUDE/nccl.h" ] || { echo "no nccl.h in $NCCL_INCLUDE (set NCCL_INCLUDE)"; exit 1; }
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
# A CPU torch lacks this generated header of its CUDA wheels; stand in for it.
mkdir -p "$OUT/shim/c10/cuda/impl"
echo "#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS" > "$OUT/shim/c10/cuda/impl/cuda_cmake_macros.h"
STD=-std=c++20
FLAGS="$STD -idirafter $OUT/shim -O2 -fPIC -DTETRI_WITH_CUDA=1 -DTORCH_EXTENSION_NAME=_C -Wall -Wextra -Wno-unused-parameter -Icsrc $TORCH_INC -I$PY_INC -I$CUDA_HOME/include -I$NCCL_INCLUDE"

echo "nvcc latent_kernels.cu (sm_90)"
"$CUDA_HOME/bin/nvcc" $STD -O3 -arch=sm_90 -Xcompiler -fPIC -Xcompiler -Wall -Icsrc -c csrc/latent_kernels.cu -o "$OUT/latent_kernels.o"
for src in nccl_comm.cpp latent_ops.cpp comm_cache.cpp step_loop.cpp bindings.cpp; do
  echo "c++ $src (TETRI_WITH_CUDA)"
  ${CXX:-c++} $FLAGS -c "csrc/$src" -o "$OUT/${src%.cpp}.o"
done
echo "undefined NCCL / CUDA runtime symbols the link must provide:"
nm -C -u "$OUT"/*.o | grep -E " (nccl|cuda)[A-Za-z]*$" | sort -u | sed 's/^ *U /  /'
echo "CUDA build sources compile"
