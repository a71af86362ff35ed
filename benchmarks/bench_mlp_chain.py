"""Benchmark of the fused MLP perturb -> decode -> label chain against the same modules called one by one.

    python benchmarks/bench_mlp_chain.py [--b 4096] [--k 10 1000] [--dtype float32] [--repeats 9] [--grad] [--threads N]
                                   [--json F]

Teacher of the TGT issue: decoder 64 -> 256 -> 784 (ReLU, then sigmoid out), labeler 784 -> 256 -> K (ReLU),
latent codes z [B, 64]. Rows, all on the same inputs and in one process:

* ``eager``: ``x = decoder(z + sigma * torch.randn_like(z))``, ``softmax(labeler(x) / T)`` (the nn.Modules);
* ``fused-<backend>``: ``tgtfast._mlp.perturb_decode_label_mlp`` on every backend available for the device
  (``cpp`` on the CPU; ``cuda`` and ``triton`` on a GPU).

Each row gives the median time of the forward (``--grad``: forward and backward to z, with z requiring grad)
over ``--repeats`` runs after warm-up (the rows take turns, one run each, so that a change of load on a shared
machine hits them alike), its min-max spread, the speed-up over eager, on the CPU the minor page faults per call
(fresh memory the kernel maps and zeroes: what the allocator costs), and the peak extra memory:
on the CPU the peak RSS of a fresh subprocess per row above its RSS before the timed call (VmHWM reset through
/proc/self/clear_refs, as tgtfast/bench/ does for PTLoss); on a GPU ``torch.cuda.max_memory_allocated``
above the inputs. The fused rows are checked against eager with the same noise (latent_noise).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

import tgtfast
from tgtfast.bench import _peak_rss_bytes as _peak_rss, _rss_bytes as _rss, _sync, time_in_turns
from tgtfast import _mlp, reference

SIGMA, SEED, TEMPERATURE, LATENT = 0.5, 1234, 2.0, 64


def make_teacher(k: int, device: torch.device, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    decoder = nn.Sequential(nn.Linear(LATENT, 256), nn.ReLU(), nn.Linear(256, 784), nn.Sigmoid())
    labeler = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, k))
    for m in (decoder, labeler):
        m.requires_grad_(False).to(device=device, dtype=dtype)
    return decoder, labeler, g


def make_step(impl: str, decoder: nn.Module, labeler: nn.Module) -> Callable[[torch.Tensor], tuple]:
    if impl == "eager":
        def eager(z):
            x = decoder(z + SIGMA * torch.randn_like(z))
            return x, torch.softmax(labeler(x) / TEMPERATURE, dim=-1)

        return eager
    backend = impl.split("-", 1)[1]
    dec, lab = _mlp.as_mlp(decoder, name="decoder"), _mlp.as_mlp(labeler, name="labeler")
    return lambda z: _mlp.perturb_decode_label_mlp(z, dec, lab, sigma=SIGMA, seed=SEED, temperature=TEMPERATURE,
                                                   backend=backend)


def run_once(step, z: torch.Tensor, grad: bool) -> None:
    x, s = step(z)
    if grad:
        z.grad = None
        (x.float().sum() + s[:, 0].float().sum()).backward()


def available_impls(device: torch.device) -> List[str]:
    avail = tgtfast.backends(_mlp.OP)
    names = ("cpp",) if device.type == "cpu" else ("cuda", "triton")
    return ["eager"] + [f"fused-{b}" for b in names if avail[b] == "available"]


def peak_memory_child(impl: str, b: int, k: int, dtype: str, grad: bool) -> int:
    """Run in a fresh process: peak RSS of one call above the RSS before it (bytes)."""
    device, dt = torch.device("cpu"), getattr(torch, dtype)
    decoder, labeler, g = make_teacher(k, device, dt)
    step = make_step(impl, decoder, labeler)
    for _ in range(2):  # warm up code paths and thread pools on a small batch
        run_once(step, torch.randn(64, LATENT, generator=g).to(dt).requires_grad_(grad), grad)
    z = torch.randn(b, LATENT, generator=g).to(dt).requires_grad_(grad)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = _rss()
    run_once(step, z, grad)
    return max(_peak_rss() - base, 0)


def _peak_memory_subprocess(impl: str, b: int, k: int, dtype: str, grad: bool) -> Optional[int]:
    here = os.path.dirname(os.path.abspath(__file__))
    code = f"from bench_mlp_chain import peak_memory_child as f; print(f({impl!r}, {b}, {k}, {dtype!r}, {grad}))"
    try:  # run beside this file, never from a source checkout of tgtfast (it holds no build)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=here,
                             env=dict(os.environ, TGTFAST_QUIET="1"))
        return int(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


def run(b: int, k: int, dtype: torch.dtype, device: torch.device, repeats: int, grad: bool,
        memory: bool = True, impls: Optional[List[str]] = None) -> Dict:
    decoder, labeler, g = make_teacher(k, device, dtype)
    z = torch.randn(b, LATENT, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)
    impls = impls or available_impls(device)
    # correctness: every fused row against the modules fed the same noise
    noise = reference.latent_noise(z.shape, SEED, 0, device=device, dtype=torch.float32)
    with torch.no_grad():
        x_ref = decoder((z.float() + SIGMA * noise).to(dtype))
        s_ref = torch.softmax(labeler(x_ref) / TEMPERATURE, dim=-1)
    steps = {impl: make_step(impl, decoder, labeler) for impl in impls}
    errs = {}
    for impl, step in steps.items():
        errs[impl] = None
        if impl != "eager":
            with torch.no_grad():
                x, s = step(z.detach())
            errs[impl] = max(float((x.float() - x_ref.float()).abs().max()),
                             float((s.float() - s_ref.float()).abs().max()))
        for _ in range(3):
            run_once(step, z, grad)
    times, faults = time_in_turns({impl: (lambda step=step: run_once(step, z, grad)) for impl, step in steps.items()},
                                  device, repeats)
    rows = []
    for impl, step in steps.items():
        ts = times[impl]
        row = {"impl": impl, "median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts),
               "max_abs_err_vs_eager": errs[impl]}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            run_once(step, z, grad)
            _sync(device)
            row["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
        else:
            row["page_faults_per_call"] = statistics.median(faults[impl])
            if memory:
                row["peak_extra_bytes"] = _peak_memory_subprocess(impl, b, k, str(dtype).split(".")[-1], grad)
        rows.append(row)
    eager = next((r for r in rows if r["impl"] == "eager"), None)
    for r in rows:
        r["speedup_vs_eager"] = eager["median_s"] / r["median_s"] if eager else None
    return {"op": "perturb_decode_label_mlp" + ("_fwd_bwd" if grad else "_fwd"), "B": b, "K": k,
            "widths": f"{LATENT}->256->784 | 784->256->{k}", "dtype": str(dtype).split(".")[-1],
            "device": device_name(device), "rows": rows}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def format_table(res: Dict) -> str:
    out = [f"{res['op']}  B={res['B']} K={res['K']} ({res['widths']}) {res['dtype']} on {res['device']}",
           f"{'impl':<14}{'median ms':>10}{'spread ms':>16}{'x eager':>9}{'peak extra MB':>15}{'max err':>10}"
           f"{'faults/call':>13}"]
    for r in res["rows"]:
        peak = r.get("peak_extra_bytes")
        err = r["max_abs_err_vs_eager"]
        spread = "%.1f-%.1f" % (r["min_s"] * 1e3, r["max_s"] * 1e3)
        peak_txt = "-" if peak is None else "%.1f" % (peak / 2**20)
        err_txt = "-" if err is None else "%.1e" % err
        out.append(f"{r['impl']:<14}{r['median_s'] * 1e3:>10.1f}{spread:>16}"
                   f"{r['speedup_vs_eager'] or float('nan'):>9.2f}{peak_txt:>15}{err_txt:>10}"
                   f"{r.get('page_faults_per_call', '-'):>13}")
    return "\n".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Fused MLP perturb -> decode -> label vs eager modules.")
    parser.add_argument("--b", type=int, default=4096)
    parser.add_argument("--k", type=int, nargs="+", default=[10, 1000])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--grad", action="store_true", help="time forward + backward to z")
    parser.add_argument("--no-memory", action="store_true", help="skip the CPU peak-memory subprocesses")
    parser.add_argument("--impl", nargs="+", help="rows to run (default: eager and every available backend)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for the timed runs (CPU)")
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    results = []
    for k in args.k:
        res = run(args.b, k, getattr(torch, args.dtype), device, args.repeats, args.grad,
                  memory=not args.no_memory, impls=args.impl)
        print(format_table(res), flush=True)
        results.append(res)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"torch": torch.__version__, "results": results}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
