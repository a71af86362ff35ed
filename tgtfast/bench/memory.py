"""Peak memory for ``tgtfast bench`` on the CPU: one call of one implementation in a fresh subprocess, its peak
RSS above the RSS before the call (``/proc/self/clear_refs`` resets the kernel's counter). :class:`LiveBytes`
counts the bytes of the tensors a call creates instead, on any device (the meta device included)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
import weakref
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import tgtfast
from tgtfast.bench.registry import BUILDERS


class LiveBytes(TorchDispatchMode):
    """Inside ``with LiveBytes() as m:``, ``m.live`` is the number of bytes of the storages that ops have created
    (outputs that are not views of an input) and that are still alive, and ``m.peak`` its maximum: what a
    caching allocator's peak would report above what was allocated before, less its block rounding. Works on
    the meta device, so the peak of a computation too large to run can be traced."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {x.untyped_storage()._cdata for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st._cdata
                if key in self._seen or key in inputs or st.nbytes() == 0:
                    continue
                self._seen.add(key)
                self.live += st.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(st, self._free, key, st.nbytes())
        return out

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.discard(key)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_pass(fn: Callable[[], Any], device: torch.device) -> Tuple[float, Any, int]:
    """One call of `fn` after warm-up: ``(seconds, its result, peak bytes above what was held before it)``. The
    blocks tgtfast's C++ ops keep for reuse are freed first, so that the call allocates its own outputs. CPU: the
    peak resident set size (``VmHWM`` after ``/proc/self/clear_refs``) minus the RSS before; CUDA:
    ``torch.cuda.max_memory_allocated`` minus the allocation before."""
    from tgtfast.bench.timing import _sync

    tgtfast.empty_cpu_cache()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as fh:  # reset the peak resident set size (VmHWM)
            fh.write("5")
        base = _rss_bytes()
    start = time.perf_counter()
    out = fn()
    _sync(device)
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else _peak_rss_bytes()) - base
    return seconds, out, peak


def _tiny(shape: Dict[str, int]) -> Dict[str, int]:
    return {key: min(val, 8 if key in ("N", "B", "C") else 64) for key, val in shape.items()}


def _peak_memory_child(op: str, impl: str, shape_json: str, dtype: str) -> int:
    """Run in a fresh process: peak RSS growth of one call of `impl` (inputs excluded)."""
    shape = json.loads(shape_json)
    dt = getattr(torch, dtype)
    cpu = torch.device("cpu")
    warm = BUILDERS[op](_tiny(shape), dt, cpu, [impl])  # code paths, thread pools, compilation
    warm.run[impl]()
    warm.run[impl]()
    case = BUILDERS[op](shape, dt, cpu, [impl])
    with open("/proc/self/clear_refs", "w") as fh:  # reset the peak resident set size (VmHWM)
        fh.write("5")
    base = _rss_bytes()
    case.run[impl]()
    return max(_peak_rss_bytes() - base, 0)


def _peak_memory_subprocess(op: str, impl: str, shape: Dict[str, int], dtype: str) -> Optional[int]:
    code = (
        "from tgtfast.bench.memory import _peak_memory_child as f; "
        f"print(f({op!r}, {impl!r}, {json.dumps(json.dumps(shape))}, {dtype!r}))"
    )
    env = dict(os.environ, TGTFAST_QUIET="1")
    # run from the folder that holds this tgtfast, so that the child imports the same package (and its build)
    # whatever the working directory is (from a source checkout, `-c` would put the unbuilt tree first)
    here = os.path.dirname(os.path.dirname(os.path.abspath(tgtfast.__file__)))
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800,
                             cwd=here)
        return int(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None
