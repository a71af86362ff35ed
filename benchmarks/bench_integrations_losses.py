"""The loss drop-ins of tgtfast.integrations against the functions they replace: time and peak memory of
forward+backward.

Cases (``--case``, both by default):

* ``logits``: TRL's ``GKDTrainer.generalized_jsd_loss`` (``trl``) against
  ``tgtfast.integrations.trl.generalized_jsd_loss`` (``tgtfast``) on ``[B, L, V]`` student logits with a gradient
  and frozen teacher logits (default 8 x 512 x 32000 float32), beta 0.5, temperature 1, labels with 10% ``-100``,
  ``reduction="batchmean"``.
* ``fused``: Liger-Kernel's ``LigerFusedLinearJSDLoss`` with its default ``compiled=True`` (``liger``) and with
  ``compiled=False`` (``liger_eager``) against ``tgtfast.integrations.liger.FusedLinearJSDLoss`` (``tgtfast``) on
  student hidden states and weight with gradients and a frozen teacher (default N=4096, H=1024, V=32000
  float32), weights 0.5 / 0.5, beta 0.5, both with Liger's default ``chunk_size=1024`` rows (``--chunk-size``;
  ``--tgtfast-chunk-size`` gives tgtfast another).

Each variant runs in its own subprocess, as benchmarks/bench_fused_linear.py does: one forward+backward at the
real shape as warm-up (it also compiles), then the peak resident set size is reset (``/proc/self/clear_refs``)
and the next forward+backward gives the peak memory above what was held before it (``VmHWM`` minus the RSS, after
emptying the blocks tgtfast's C++ ops keep for reuse; on a GPU ``torch.cuda.max_memory_allocated`` above the
allocation) and the first time; further repeats give the median. The loss values are compared with the peer's.

    python benchmarks/bench_integrations_losses.py
    python benchmarks/bench_integrations_losses.py --case fused --n 1024 --v 8000      # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional

import torch

from tgtfast.bench import _sync, device_name
from tgtfast.bench.memory import measure_pass

VARIANTS = {"logits": ("trl", "tgtfast"), "fused": ("liger", "liger_eager", "tgtfast")}
PEER = {"logits": "trl", "fused": "liger"}


def make_inputs(case: str, args, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(device=device, dtype=dtype)

    if case == "logits":
        lead = (args.b, args.l)
        x = {"s": rand(*lead, args.v, s=2.0).requires_grad_(True), "t": rand(*lead, args.v, s=2.0)}
    else:
        lead = (args.n,)
        scale = 3 * args.h ** -0.5
        x = {"hs": rand(args.n, args.h).requires_grad_(True), "ws": rand(args.v, args.h, s=scale).requires_grad_(True),
             "ht": rand(args.n, args.h), "wt": rand(args.v, args.h, s=scale)}
    labels = torch.randint(0, args.v, lead, generator=g)
    labels[torch.rand(lead, generator=g) < 0.1] = -100
    x["labels"] = labels.to(device)
    return x


def make_step(case: str, variant: str, args) -> Callable[[Dict[str, torch.Tensor]], torch.Tensor]:
    """x -> loss of one variant."""
    if case == "logits":
        if variant == "trl":
            warnings.filterwarnings("ignore", message=".*trl.experimental.*")
            from trl.experimental.gkd import GKDTrainer

            fn = GKDTrainer.generalized_jsd_loss
        else:
            from tgtfast.integrations.trl import generalized_jsd_loss as fn
        return lambda x: fn(x["s"], x["t"], x["labels"], beta=args.beta, temperature=args.temperature)
    if variant.startswith("liger"):
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss as cls
    else:
        from tgtfast.integrations.liger import FusedLinearJSDLoss as cls
    options = dict(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=args.beta, temperature=args.temperature,
                   compiled=variant != "liger_eager")
    options["chunk_size"] = args.tgtfast_chunk_size if variant == "tgtfast" and args.tgtfast_chunk_size else \
        args.chunk_size
    loss_fn = cls(**options)
    return lambda x: loss_fn(x["hs"], x["ws"], x["ht"], x["wt"], x["labels"])


def _fwd_bwd(step, x) -> torch.Tensor:
    for v in x.values():
        v.grad = None
    loss = step(x)
    loss.backward()
    return loss.detach()


def run_child(case: str, variant: str, args) -> Dict:
    """In the subprocess: warm-up, one measured pass for peak memory and time, then the repeats."""
    device = torch.device(args.device)
    x = make_inputs(case, args, device, getattr(torch, args.dtype))
    step = make_step(case, variant, args)
    _fwd_bwd(step, x)  # warm-up (and compilation)
    for v in x.values():
        v.grad = None
    first, loss, peak = measure_pass(lambda: _fwd_bwd(step, x), device)  # tgtfast's reused blocks freed first
    times = [first]
    for _ in range(args.repeats - 1):
        start = time.perf_counter()
        _fwd_bwd(step, x)
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"case": case, "variant": variant, "times_s": times, "median_s": statistics.median(times),
            "peak_extra_bytes": peak, "loss": float(loss)}


def _run_variant(case: str, variant: str, argv: List[str]) -> Dict:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child", f"{case}:{variant}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        return {"case": case, "variant": variant, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_rows(rows: List[Dict], args) -> str:
    shapes = {"logits": f"[{args.b}, {args.l}, {args.v}]", "fused": f"N={args.n} H={args.h} V={args.v}"}
    lines = [f"fwd+bwd, {args.dtype} on {device_name(torch.device(args.device))}, "
             f"repeats={args.repeats}, beta={args.beta}, T={args.temperature}",
             f"{'case':<8}{'shape':<24}{'variant':<13}{'median s':>10}{'min s':>9}{'peak MiB':>10}"
             f"{'time/peer':>11}{'peak/peer':>11}{'loss rel diff':>15}"]
    peers = {r["case"]: r for r in rows if "error" not in r and r["variant"] == PEER[r["case"]]}
    for r in rows:
        head = f"{r['case']:<8}{shapes[r['case']]:<24}{r['variant']:<13}"
        if "error" in r:
            lines.append(f"{head} failed: {r['error']}")
            continue
        peer = peers.get(r["case"])
        t_ratio = r["median_s"] / peer["median_s"] if peer else float("nan")
        p_ratio = r["peak_extra_bytes"] / max(peer["peak_extra_bytes"], 1) if peer else float("nan")
        diff = abs(r["loss"] - peer["loss"]) / max(abs(peer["loss"]), 1e-30) if peer else float("nan")
        lines.append(f"{head}{r['median_s']:>10.3f}{min(r['times_s']):>9.3f}{r['peak_extra_bytes'] / 2**20:>10.0f}"
                     f"{t_ratio:>11.2f}{p_ratio:>11.3f}{diff:>15.1e}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--b", type=int, default=8, help="logits case: batch")
    parser.add_argument("--l", type=int, default=512, help="logits case: sequence length")
    parser.add_argument("--n", type=int, default=4096, help="fused case: rows (tokens)")
    parser.add_argument("--h", type=int, default=1024, help="fused case: hidden size (student and teacher)")
    parser.add_argument("--v", type=int, default=32000, help="vocabulary size")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--chunk-size", type=int, default=1024, help="fused case: Liger's chunk_size (its default)")
    parser.add_argument("--tgtfast-chunk-size", type=int, help="fused case: tgtfast's chunk_size (default: "
                                                                 "--chunk-size)")
    parser.add_argument("--variants", nargs="+", help="only these variants (names as in the table)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per variant (the first also measures "
                                                               "peak memory)")
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        case, variant = args.child.split(":")
        print(json.dumps(run_child(case, variant, args)))
        return 0
    forwarded = list(argv if argv is not None else sys.argv[1:])
    rows = []
    for case in args.case:
        for variant in VARIANTS[case]:
            if args.variants and variant not in args.variants:
                continue
            rows.append(_run_variant(case, variant, forwarded))
            print(json.dumps(rows[-1]), flush=True)
    print(format_rows(rows, args))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "torch": torch.__version__, "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
