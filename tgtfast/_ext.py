"""Loads the compiled extension ``tgtfast._C`` once; the package works without it."""

from __future__ import annotations

import logging
import os
from types import ModuleType
from typing import Optional

logger = logging.getLogger("tgtfast")

ext: Optional[ModuleType] = None
error: Optional[str] = None

try:  # importing the module also registers the torch.ops.tgtfast operators
    from tgtfast import _C as ext  # type: ignore[attr-defined,no-redef]
except ImportError as exc:  # pragma: no cover - depends on how the package was built
    ext = None
    error = f"{type(exc).__name__}: {exc}"
    if "partially initialized" in str(exc):
        error += " -- tgtfast was imported from its source checkout, which holds no build; run from elsewhere"
    if os.environ.get("TGTFAST_QUIET", "0") != "1":
        logger.warning(
            "tgtfast: the compiled extension could not be loaded (%s); the C++/CUDA backends are off and "
            "ops fall back to Triton (GPU) or the PyTorch reference. Reinstall with "
            "`pip install --no-build-isolation .` to build it.",
            error,
        )


def empty_cpu_cache() -> int:
    """Free the CPU output blocks the fused ops keep for reuse; returns the number of bytes released.

    The C++ ops write their large outputs (the losses' gradients, the TGT step's samples and soft labels) into
    blocks on huge pages and keep up to four freed blocks (at most ``TGTFAST_CPU_CACHE_MB`` MiB, default 2048; 0
    turns the cache off) for the next call of the same size, so a training loop does not fault fresh memory in
    every step. Like ``torch.cuda.empty_cache``,
    this only returns memory no tensor uses.
    """
    return int(ext.release_cached_buffers()) if ext is not None else 0


def built_with_cuda() -> bool:
    return ext is not None and bool(ext.built_with_cuda())
