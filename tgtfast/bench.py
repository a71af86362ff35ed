"""Benchmarks behind ``tgtfast bench``: every PTLoss implementation on the same inputs, in one process.

For each row: median time of forward+backward (and spread), speed-up over the eager reference and over
``torch.compile`` of it, achieved bandwidth against the copy bandwidth measured in the same run (the memory
roofline: read student and teacher logits, write the gradient), peak extra memory, and whether the result
matched the reference.

Peak memory on the CPU is measured in a fresh subprocess per implementation: after a warm-up on small inputs,
the real inputs are allocated, the kernel's peak-RSS counter is reset (``/proc/self/clear_refs``), one
forward+backward runs, and the peak RSS (``VmHWM``) minus the RSS before it is reported. On a GPU it is ``torch.cuda.max_memory_allocated`` above the inputs.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

import tgtfast
from tgtfast import reference

IMPLS = ("eager", "compile", "cpp", "triton", "cuda")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timeit(fn: Callable[[], None], device: torch.device, repeats: int, warmup: int = 2) -> List[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def copy_bandwidth(nbytes: int, device: torch.device, repeats: int = 7) -> float:
    """Bytes per second moved by ``dst.copy_(src)`` (counting the read and the write)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = _timeit(lambda: dst.copy_(src), device, repeats)
    return 2 * src.numel() * 4 / statistics.median(times)


def make_inputs(n: int, k: int, m: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    s = (torch.randn(n, k, generator=g) * 3).to(device=device, dtype=dtype)
    t = (torch.randn(n, k, generator=g) * 3).to(device=device, dtype=dtype)
    coeffs = torch.linspace(-0.5, 2.0, m).to(device) if m else None
    return s, t, coeffs


def make_step(impl: str, coeffs: Optional[torch.Tensor]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A function (student, teacher) -> loss running one implementation."""
    if impl == "eager":
        return lambda s, t: reference.ptloss(s, t, coeffs)
    if impl == "compile":
        return torch.compile(lambda s, t: reference.ptloss(s, t, coeffs))
    return lambda s, t: tgtfast.ptloss(s, t, coeffs, backend=impl)


def available_impls(device: torch.device, dtype: torch.dtype) -> List[str]:
    avail = tgtfast.backends()
    out = ["eager", "compile"]
    for name in ("cpp", "triton", "cuda"):
        if avail[name] != "available":
            continue
        if (name == "cpp") != (device.type == "cpu"):
            continue
        if name == "cpp" and dtype not in (torch.float32, torch.bfloat16, torch.float64):
            continue
        out.append(name)
    return out


def _fwd_bwd(step, s, t):
    s.grad = None
    step(s, t).backward()


def _peak_memory_subprocess(impl: str, n: int, k: int, m: int, dtype: str) -> Optional[int]:
    code = (
        "import sys; from tgtfast.bench import _peak_memory_child as f; "
        f"print(f({impl!r}, {n}, {k}, {m}, {dtype!r}))"
    )
    env = dict(os.environ, TGTFAST_QUIET="1")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
        return int(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_memory_child(impl: str, n: int, k: int, m: int, dtype: str) -> int:
    dt = getattr(torch, dtype)
    device = torch.device("cpu")
    step = make_step(impl, make_inputs(1, 8, m, dt, device)[2])
    s, t, _ = make_inputs(8, min(k, 64), m, dt, device)  # warm up code paths, thread pools, compilation
    s.requires_grad_(True)
    _fwd_bwd(step, s, t)
    _fwd_bwd(step, s, t)
    s, t, _ = make_inputs(n, k, m, dt, device)
    s.requires_grad_(True)
    with open("/proc/self/clear_refs", "w") as fh:  # reset the peak resident set size (VmHWM)
        fh.write("5")
    base = _rss_bytes()
    _fwd_bwd(step, s, t)
    return max(_peak_rss_bytes() - base, 0)


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_ptloss(n: int = 1024, k: int = 32000, m: int = 5, dtype: torch.dtype = torch.float32,
               device: Optional[torch.device] = None, repeats: int = 7, memory: bool = True,
               impls: Optional[List[str]] = None) -> Dict:
    """Benchmark PTLoss forward+backward on one shape; returns a JSON-able dict."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    s, t, coeffs = make_inputs(n, k, m, dtype, device)
    s.requires_grad_(True)
    impls = impls or available_impls(device, dtype)
    elem = s.element_size()
    moved = 3 * n * k * elem  # read student and teacher, write the gradient
    bandwidth = copy_bandwidth(max(moved // 3, 1 << 24), device)
    truth = None
    rows = []
    for impl in impls:
        step = make_step(impl, coeffs)
        _fwd_bwd(step, s, t)
        grad = s.grad.detach().double()
        loss = float(step(s, t).detach())
        if truth is None:
            truth = (loss, grad)
        err = max(abs(loss - truth[0]) / max(1.0, abs(truth[0])), float((grad - truth[1]).abs().max()))
        times = _timeit(lambda: _fwd_bwd(step, s, t), device, repeats)
        med = statistics.median(times)
        row = {
            "impl": impl,
            "median_s": med,
            "min_s": min(times),
            "max_s": max(times),
            "bytes_per_s": moved / med,
            "roofline_fraction": moved / med / bandwidth,
            "max_abs_err_vs_eager": err,
            "matches_reference": err < (1e-4 if dtype == torch.float32 else 3e-2),
        }
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            _fwd_bwd(step, s, t)
            row["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
        elif memory:
            row["peak_extra_bytes"] = _peak_memory_subprocess(impl, n, k, m, str(dtype).split(".")[-1])
        rows.append(row)
    by = {r["impl"]: r for r in rows}
    for r in rows:
        r["speedup_vs_eager"] = by["eager"]["median_s"] / r["median_s"] if "eager" in by else None
        r["speedup_vs_compile"] = by["compile"]["median_s"] / r["median_s"] if "compile" in by else None
        if r.get("peak_extra_bytes") is not None:
            r["peak_extra_vs_logits"] = r["peak_extra_bytes"] / (n * k * elem)
    return {
        "op": "ptloss_fwd_bwd",
        "shape": {"N": n, "K": k, "M": m},
        "dtype": str(dtype).split(".")[-1],
        "device": device_name(device),
        "copy_bandwidth_bytes_per_s": bandwidth,
        "ideal_time_s": moved / bandwidth,
        "rows": rows,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def environment() -> Dict[str, Optional[str]]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_isa": tgtfast._ext.ext.cpu_isa() if tgtfast._ext.ext is not None else None,
        "threads": str(torch.get_num_threads()),
    }


def format_table(result: Dict) -> str:
    head = (f"PTLoss fwd+bwd  N={result['shape']['N']} K={result['shape']['K']} M={result['shape']['M']} "
            f"{result['dtype']} on {result['device']}\n"
            f"copy bandwidth {result['copy_bandwidth_bytes_per_s'] / 1e9:.2f} GB/s -> ideal "
            f"{result['ideal_time_s'] * 1e3:.1f} ms\n")
    cols = f"{'impl':<9}{'median ms':>10}{'spread ms':>14}{'x eager':>9}{'x compile':>10}{'GB/s':>8}" \
           f"{'roofline':>9}{'peak/logits':>12}{'match':>7}\n"
    lines = []
    for r in result["rows"]:
        peak = r.get("peak_extra_vs_logits")
        spread = f"{r['min_s'] * 1e3:.1f}-{r['max_s'] * 1e3:.1f}"
        peak_txt = "-" if peak is None else f"{peak:.2f}"
        lines.append(
            f"{r['impl']:<9}{r['median_s'] * 1e3:>10.1f}{spread:>14}"
            f"{r['speedup_vs_eager'] or float('nan'):>9.2f}{r['speedup_vs_compile'] or float('nan'):>10.2f}"
            f"{r['bytes_per_s'] / 1e9:>8.2f}{r['roofline_fraction'] * 100:>8.0f}%"
            f"{peak_txt:>12}{'yes' if r['matches_reference'] else 'NO':>7}"
        )
    return head + cols + "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="tgtfast bench", description="Benchmark the fused PTLoss op.")
    parser.add_argument("--op", default="ptloss", choices=["ptloss"])
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--k", type=int, nargs="+", default=[32000])
    parser.add_argument("--m", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--impl", nargs="+", choices=IMPLS, help="implementations to run (default: all available)")
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    results = []
    for k in args.k:
        res = run_ptloss(args.n, k, args.m, getattr(torch, args.dtype), repeats=args.repeats,
                         memory=not args.no_memory, impls=args.impl)
        print(format_table(res), flush=True)
        results.append(res)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"environment": environment(), "results": results}, fh, indent=2)
    return 0
