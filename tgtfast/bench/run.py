"""Running one op of ``tgtfast bench`` on one shape: every implementation, checked against the reference, timed
in turns, with the roofline, page faults and peak memory (:func:`run_case`)."""

from __future__ import annotations

import statistics
from typing import Any, Dict, List, Optional

import torch

from tgtfast.bench.memory import _peak_memory_subprocess
from tgtfast.bench.registry import BUILDERS
from tgtfast.bench.report import device_name
from tgtfast.bench.timing import copy_bandwidth, time_in_turns


def run_case(op: str, shape: Dict[str, int], dtype: torch.dtype = torch.float32,
             device: Optional[torch.device] = None, repeats: int = 7, memory: bool = True,
             impls: Optional[List[str]] = None, bandwidth: Optional[float] = None) -> Dict:
    """Benchmark every implementation of `op` on one shape; returns a JSON-able dict. ``op="import"`` measures
    the import time instead (:func:`tgtfast.bench.run_import`, `repeats` processes per module; the other
    arguments do not apply)."""
    if op == "import":
        from tgtfast.bench.import_time import run_import

        return run_import(repeats)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    case = BUILDERS[op](shape, dtype, device, impls)
    if bandwidth is None and case.moved_bytes:
        bandwidth = copy_bandwidth(case.moved_bytes // 3, case.device)
    rows = []
    truth = None
    if case.truth is not None:
        truth = case.truth()
    errs = {}
    for impl, fn in case.run.items():
        out = fn()
        if truth is None:
            truth = out
        errs[impl] = None if impl in case.incomparable else case.compare(out, truth)
        del out
        fn()  # warm-up
    times, faults = time_in_turns(case.run, case.device, repeats)
    for impl, fn in case.run.items():
        err = errs[impl]
        med = statistics.median(times[impl])
        row: Dict[str, Any] = {
            "impl": impl,
            "median_s": med,
            "min_s": min(times[impl]),
            "max_s": max(times[impl]),
            "ns_per_" + case.work_unit: med / max(case.work, 1) * 1e9,
            "max_err_vs_reference": err,
            "matches_reference": None if err is None else bool(err <= case.tol),
        }
        if case.device.type == "cpu":
            row["page_faults_per_call"] = statistics.median(faults[impl])
        if case.moved_bytes:
            row["bytes_per_s"] = case.moved_bytes / med
            row["roofline_fraction"] = case.moved_bytes / med / bandwidth
        if case.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            row["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
        elif memory:
            row["peak_extra_bytes"] = _peak_memory_subprocess(op, impl, shape, str(case.dtype).split(".")[-1])
        rows.append(row)
    by = {r["impl"]: r for r in rows}
    for r in rows:
        r["speedup_vs_eager"] = by["eager"]["median_s"] / r["median_s"] if "eager" in by else None
        r["speedup_vs_compile"] = by["compile"]["median_s"] / r["median_s"] if "compile" in by else None
        if op in ("ptloss", "divergence") and r.get("peak_extra_bytes") is not None:
            r["peak_extra_vs_logits"] = r["peak_extra_bytes"] / (shape["N"] * shape["K"] * torch.finfo(dtype).bits // 8)
    return {
        "op": op,
        "shape": dict(shape),
        "dtype": str(case.dtype).split(".")[-1],
        "device": device_name(case.device),
        "copy_bandwidth_bytes_per_s": bandwidth if case.moved_bytes else None,
        "moved_bytes": case.moved_bytes,
        "ideal_time_s": case.moved_bytes / bandwidth if case.moved_bytes else None,
        "work_unit": case.work_unit,
        "size_key": case.size_key,
        "rows": rows,
    }


def run_ptloss(n: int = 1024, k: int = 32000, m: int = 5, dtype: torch.dtype = torch.float32,
               device: Optional[torch.device] = None, repeats: int = 7, memory: bool = True,
               impls: Optional[List[str]] = None) -> Dict:
    """Benchmark PTLoss forward+backward on one shape (see :func:`run_case`)."""
    return run_case("ptloss", {"N": n, "K": k, "M": m}, dtype, device, repeats, memory, impls)
