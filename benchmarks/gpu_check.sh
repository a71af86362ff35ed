#!/usr/bin/env bash
# The GPU half of tgtfast in one command, for a fresh machine with an NVIDIA GPU, CUDA torch (2.11+) and Triton
# (3.6+) already installed and nothing to download:
#
#   1. build and install the extension with its CUDA kernels for the GPU present only (TGTFAST_CUDA_ARCHS from its
#      compute capability; ninja, ccache when found),
#   2. run the tests that have a GPU path (the GPU tests skip everywhere else),
#   3. run `tgtfast bench` for every op and backend at the GPU shapes (and PTLoss in bf16),
#   4. run every GPU kernel once under compute-sanitizer (memcheck, racecheck; benchmarks/gpu_sanitize.py),
#   5. run the rest of the test suite (CPU only, which CI runs too),
#   6. write everything under OUT: build.log, tests-*.log, bench-*.json/txt, summary.txt (device, per step status and
#      time, the benchmark tables), printed again at the end.
#
# Every step prints its start and its time and the script goes on after a failure, so a run cut short still
# leaves what it measured. Budget: about 8 minutes on an H100-class GPU (the build is most of it).
#
#   benchmarks/gpu_check.sh [--out DIR] [--python PY] [--quick] [--dry-run]
#
# --quick     small shapes only (a smoke run in a minute or two)
# --dry-run   on any machine: print every step as it would run and exercise the parts that need no GPU (the
#             Triton interpreter at tiny shapes, the benchmark entry points, the summary); CI runs this
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=gpu-check
PY=python3
QUICK=0
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0
T0=$(date +%s)

note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME LOG COMMAND...: run it (or, with --dry-run, print it), time it, record the status
step() {
  local name="$1" log="$2"; shift 2
  local start; start=$(date +%s)
  echo "== [$(( start - T0 )) s] $name: $*"
  if [ "$DRY" = 1 ] && [ "$name" != "dry" ]; then
    note "$(printf '%-28s %s' "$name" "would run: $*")"
    return 0
  fi
  "$@" > "$log" 2>&1
  local rc=$?
  tail -n 15 "$log"
  local status=ok
  [ $rc -ne 0 ] && { status="FAILED (rc=$rc, see $log)"; FAILED=$((FAILED + 1)); }
  note "$(printf '%-28s %-6s %5d s' "$name" "$status" "$(( $(date +%s) - start ))")"
}

DEVICE=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')")
ARCH=$("$PY" -c "import torch; c = torch.cuda.get_device_capability(0) if torch.cuda.is_available() else (9, 0); print(f'{c[0]}{c[1]}')")
note "device: $DEVICE; torch $("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)'); triton $("$PY" -c 'import triton; print(triton.__version__)' 2>/dev/null || echo none); arch sm_$ARCH"
if [ "$DRY" = 0 ] && [ "$DEVICE" = none ]; then
  echo "gpu_check: no CUDA device visible (use --dry-run to check the script on a CPU machine)" >&2
  exit 2
fi
command -v ccache > /dev/null && export CC="ccache gcc" CXX="ccache g++"
# shellcheck source=benchmarks/cuda_home.sh
. benchmarks/cuda_home.sh
note "CUDA_HOME=${CUDA_HOME:-unset}"

# 1. build and install (no network: --no-index --no-deps; the machine's torch is the one built against)
step build "$OUT/build.log" env TGTFAST_CUDA_ARCHS="$ARCH" MAX_JOBS="$(nproc)" \
  "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
step backends "$OUT/backends.log" "$PY" -m tgtfast.cli backends --op ptloss

# 2. the tests with a GPU path first (the CUDA and compiled-Triton tests run; about 100 s of them is CPU work);
#    the CPU-only rest, which CI runs anyway, comes last (step 5) so that a run cut short keeps what matters
GPU_TESTS=(tests/test_ptloss_cuda.py tests/test_divergence_cuda.py tests/test_sparse_cuda.py tests/test_mlp_chain.py
  tests/test_edge_matrix.py tests/test_softmax.py tests/test_noise.py tests/test_triton_device.py
  tests/test_ptloss_triton.py tests/test_divergence_triton.py tests/test_sparse_triton.py tests/test_proxy_solve.py
  tests/test_proxy_refine.py tests/test_proxy_ops.py tests/test_tgt_step.py tests/test_fused_linear.py
  tests/test_fused_linear_weight_grad.py tests/test_fused_linear_mixed.py tests/test_ops.py tests/test_dispatch.py
  tests/test_ptloss.py tests/test_ptloss_nonfinite.py tests/test_distill_weight.py tests/test_divergence_peers.py
  tests/test_triton_compile.py)
for f in "${GPU_TESTS[@]}"; do  # a renamed test file must not drop out silently (the dry run in CI checks this)
  [ -f "$f" ] || { note "GPU_TESTS names $f, which does not exist"; FAILED=$((FAILED + 1)); }
done
step tests-gpu "$OUT/tests-gpu.log" timeout 300 "$PY" -m pytest "${GPU_TESTS[@]}" -q -rfE -p no:cacheprovider

# 3. benchmarks: every op, every backend available, at the GPU shapes (tgtfast/bench/registry.py)
if [ "$QUICK" = 1 ]; then
  step bench-ptloss "$OUT/bench-ptloss.txt" "$PY" -m tgtfast.cli bench --op ptloss --shape N=1024 K=32000 \
    --repeats 5 --json "$OUT/bench-ptloss.json"
  step bench-tgt "$OUT/bench-tgt.txt" "$PY" -m tgtfast.cli bench --op tgt tgt_bwd --repeats 5 \
    --json "$OUT/bench-tgt.json"
else
  step bench-all "$OUT/bench-all.txt" timeout 240 "$PY" -m tgtfast.cli bench --op ptloss proxy tgt tgt_bwd \
    fused_linear --json "$OUT/bench-all.json"
  # 2**31 logits: the eager reference would need tens of GB for its autograd graph, so the kernels only
  step bench-ptloss-bf16 "$OUT/bench-ptloss-bf16.txt" timeout 120 "$PY" -m tgtfast.cli bench --op ptloss \
    --shape N=16384 K=131072 --dtype bfloat16 --impl cuda triton --json "$OUT/bench-ptloss-bf16.json"
  step bench-fused-bf16 "$OUT/bench-fused-bf16.txt" timeout 120 "$PY" -m tgtfast.cli bench --op fused_linear \
    --shape N=8192 H=4096 V=128256 --dtype bfloat16 --json "$OUT/bench-fused-bf16.json"
  # every divergence of the menu (D = 0..8), the kernels against eager only (compiling nine references takes minutes)
  step bench-divergence "$OUT/bench-divergence.txt" timeout 150 "$PY" -m tgtfast.cli bench --op divergence \
    --shape N=4096 K=32000 --impl eager cuda triton --repeats 5 --no-memory --json "$OUT/bench-divergence.json"
  step bench-divergence-bf16 "$OUT/bench-divergence-bf16.txt" timeout 120 "$PY" -m tgtfast.cli bench \
    --op divergence --shape N=16384 K=131072 --dtype bfloat16 --impl cuda triton --repeats 3 --no-memory \
    --json "$OUT/bench-divergence-bf16.json"
  step bench-sparse "$OUT/bench-sparse.txt" timeout 120 "$PY" -m tgtfast.cli bench --op sparse --impl eager cuda \
    triton --repeats 5 --no-memory --json "$OUT/bench-sparse.json"
fi

# 4. every GPU kernel once at small shapes under compute-sanitizer: memcheck (no caching allocator, so that an
#    access past a tensor is past its allocation) and racecheck (shared-memory hazards) of the CUDA kernels
SAN=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
if [ -x "$SAN" ] || [ "$DRY" = 1 ]; then
  step sanitize-memcheck "$OUT/sanitize-memcheck.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 150 "$SAN" \
    --tool memcheck --error-exitcode 9 "$PY" benchmarks/gpu_sanitize.py
  step sanitize-racecheck "$OUT/sanitize-racecheck.log" timeout 150 "$SAN" --tool racecheck --error-exitcode 9 \
    "$PY" benchmarks/gpu_sanitize.py --backends cuda
else
  note "compute-sanitizer not found ($SAN): sanitizer steps skipped"
fi

# 5. the rest of the suite (CPU paths, trainers, CLI, integrations)
step tests-rest "$OUT/tests-rest.log" timeout 300 "$PY" -m pytest tests -q -rfE -p no:cacheprovider \
  $(printf -- '--ignore=%s ' "${GPU_TESTS[@]}") --ignore=tests/test_cuda_launchers_compile.py

if [ "$DRY" = 1 ]; then
  # What needs no GPU, at tiny shapes: the Triton kernels through the interpreter and the bench entry point.
  step dry "$OUT/dry-tests.log" env TRITON_INTERPRET=1 "$PY" -m pytest -q -p no:cacheprovider tests/test_softmax.py \
    tests/test_ops.py
  step dry "$OUT/dry-bench.txt" env TRITON_INTERPRET=1 "$PY" -m tgtfast.cli bench --op ptloss \
    --shape N=16 K=512 M=2 --repeats 1 --no-memory --json "$OUT/dry-bench.json"
  step dry "$OUT/dry-bench-divergence.txt" env TRITON_INTERPRET=1 "$PY" -m tgtfast.cli bench --op divergence \
    --shape N=16 K=512 D=2 --impl eager cpp triton --repeats 1 --no-memory --json "$OUT/dry-bench-divergence.json"
  step dry "$OUT/dry-bench-sparse.txt" "$PY" -m tgtfast.cli bench --op sparse --shape N=16 V=512 TOPK=8 \
    --impl eager cpp --repeats 1 --no-memory --json "$OUT/dry-bench-sparse.json"
  step dry "$OUT/dry-sanitize.txt" env TRITON_INTERPRET=1 "$PY" benchmarks/gpu_sanitize.py --device cpu \
    --backends cpp triton
fi

note "total $(( $(date +%s) - T0 )) s, $FAILED step(s) failed"
echo
echo "== summary ($SUMMARY)"
cat "$SUMMARY"
for f in "$OUT"/bench-*.txt "$OUT"/dry-bench*.txt; do [ -f "$f" ] && { echo; echo "== $f"; cat "$f"; }; done
[ "$FAILED" = 0 ]
