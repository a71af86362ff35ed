"""``tgtfast bench --op import``: what ``import tgtfast`` costs over ``import torch``.

Each measurement is a fresh Python process that times one import statement (``time.perf_counter`` around it,
so the interpreter's own start-up is left out): ``import torch`` and ``import tgtfast`` (which imports torch
first) alternate, ``repeats`` of each after one unmeasured ``import tgtfast`` (which warms the file cache and
writes the bytecode). The cost of the package is the difference of the two medians; the target is
:data:`TARGET_S` at most.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from typing import Any, Dict, List

import torch

import tgtfast
from tgtfast.bench.report import device_name

TARGET_S = 0.5
MODULES = ("torch", "tgtfast")
_CODE = "import time; t = time.perf_counter(); import {module}; print(repr(time.perf_counter() - t))"


def import_seconds(module: str, timeout: float = 600) -> float:
    """Seconds that ``import <module>`` takes in a fresh interpreter (this one's executable and environment)."""
    env = dict(os.environ, TGTFAST_QUIET="1")
    # run from the folder that holds this tgtfast, so that the child imports the same package (and its build)
    here = os.path.dirname(os.path.dirname(os.path.abspath(tgtfast.__file__)))
    proc = subprocess.run([sys.executable, "-c", _CODE.format(module=module)], capture_output=True, text=True,
                          env=env, cwd=here, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"`import {module}` failed in a fresh process: {proc.stderr.strip()[-2000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def run_import(repeats: int = 5) -> Dict[str, Any]:
    """``import torch`` and ``import tgtfast`` in turns, `repeats` fresh processes each; a JSON-able dict in the
    layout of :func:`tgtfast.bench.run_case` (``rows`` per module) plus ``over_torch_s``, ``target_s`` and
    ``meets_target``."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    import_seconds("tgtfast")  # warm-up, not counted
    times: Dict[str, List[float]] = {m: [] for m in MODULES}
    for _ in range(repeats):
        for module in MODULES:
            times[module].append(import_seconds(module))
    med = {m: statistics.median(times[m]) for m in MODULES}
    over = med["tgtfast"] - med["torch"]
    rows = [{"impl": m, "median_s": med[m], "min_s": min(times[m]), "max_s": max(times[m]), "times_s": times[m],
             "over_torch_s": None if m == "torch" else over} for m in MODULES]
    return {
        "op": "import",
        "shape": {},
        "repeats": repeats,
        "dtype": None,
        "device": device_name(torch.device("cpu")),
        "rows": rows,
        "over_torch_s": over,
        "target_s": TARGET_S,
        "meets_target": bool(over <= TARGET_S),
    }

