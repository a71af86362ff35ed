#!/usr/bin/env bash
# The CUDA build of the extension on a machine without a GPU: a virtual environment with a CUDA build of torch, the
# extension built for one architecture, then imported, with a check that every op with a CUDA kernel registered it.
# Nothing runs on a GPU; this proves what benchmarks/gpu_check.sh's first step will do (build, link, load).
#
#   benchmarks/cuda_build_check.sh [--venv DIR] [--torch SPEC] [--arch 90]
#
# --torch  the torch to install in the venv (default torch==2.14.1, a CUDA build; several GB, from a local wheel
#          where the machine has one). Not for CI: CI keeps the CPU build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=/tmp/tgtfast-cuda-venv
TORCH_SPEC="torch==2.14.1"
ARCH=90
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) VENV="$2"; shift 2 ;;
    --torch) TORCH_SPEC="$2"; shift 2 ;;
    --arch) ARCH="$2"; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "cuda_build_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
# shellcheck source=benchmarks/cuda_home.sh
. benchmarks/cuda_home.sh
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "$TORCH_SPEC" numpy ninja setuptools wheel
"$VENV/bin/python" -c "import torch; assert torch.version.cuda, 'need a CUDA build of torch'; print('torch', torch.__version__)"
BUILD=$(mktemp -d)
git archive HEAD | tar -x -C "$BUILD"  # the committed tree, so the in-place CPU build here is left alone
(cd "$BUILD" && CUDA_HOME="${CUDA_HOME:-}" TGTFAST_CUDA_ARCHS="$ARCH" MAX_JOBS="$(nproc)" \
  "$VENV/bin/pip" install -q --no-build-isolation --no-deps .)
rm -rf "$BUILD"
cd /tmp && "$VENV/bin/python" - <<'PY'
import torch
import tgtfast
from tgtfast.ops import mlp_chain

assert tgtfast._ext.built_with_cuda(), "the extension was built without its CUDA kernels"
gpu_ops = ["ptloss_fwd", "divergence_fwd", "sparse_coarse_fwd", "sparse_coarse_bwd", "perturb", "latent_noise_",
           "temperature_softmax", "mlp_chain_fwd", "mlp_chain_bwd", "proxy_solve", "proxy_deviation_sums"]
missing = [op for op in gpu_ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"tgtfast::{op}", "CUDA")]
assert not missing, f"no CUDA kernel registered for {missing}"
assert "cuda" in mlp_chain.BWD
print(f"built with CUDA {torch.version.cuda}; CUDA kernels registered for all {len(gpu_ops)} GPU ops")
print(tgtfast.backends())
PY
