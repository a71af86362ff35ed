"""Timing for ``tgtfast bench``: implementations taking turns (:func:`time_in_turns`), minor page faults, the
device sync, and the copy bandwidth the memory roofline is measured against."""

from __future__ import annotations

import resource
import statistics
import time
from typing import Any, Callable, Dict, List, Tuple

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timeit(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 2) -> List[float]:
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


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_in_turns(fns: Dict[str, Callable[[], Any]], device: torch.device, repeats: int
                  ) -> Tuple[Dict[str, List[float]], Dict[str, List[int]]]:
    """Times one call of each of `fns` per round, `repeats` rounds: the implementations take turns, so that a
    change of load on a shared machine hits them alike and their ratios stay fair. Returns the seconds and the
    minor page faults (fresh memory the kernel maps and zeroes; 0 where unknown) of every call, per name."""
    times: Dict[str, List[float]] = {name: [] for name in fns}
    faults: Dict[str, List[int]] = {name: [] for name in fns}
    _sync(device)
    for _ in range(repeats):
        for name, fn in fns.items():
            f0 = _minor_faults()
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
            faults[name].append(_minor_faults() - f0)
    return times, faults


def copy_bandwidth(nbytes: int, device: torch.device, repeats: int = 9) -> float:
    """Bytes per second moved by ``dst.copy_(src)`` (counting the read and the write), on buffers of `nbytes`
    but at least 64 MiB, so that the roofline is the memory's and not a cache's (or the timer's)."""
    src = torch.ones(max(nbytes, 64 << 20) // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = _timeit(lambda: dst.copy_(src), device, repeats)
    return 2 * src.numel() * 4 / statistics.median(times)
