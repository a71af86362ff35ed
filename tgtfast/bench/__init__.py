"""Benchmarks behind ``tgtfast bench``: every implementation of an op on the same inputs, in one process.

Ops (``--op``; all of them by default):

* ``ptloss``: PTLoss forward+backward (shape ``N, K, M``).
* ``proxy``: the Proxy Teacher coefficient search (``N, K, M`` and ``C`` candidates).
* ``tgt``: the perturb -> decode -> label step of TGT, forward only, and ``tgt_bwd``: with the backward to the
  latent codes (``B``, latent ``D``, decoder ``D -> 256 -> X``, labeler ``X -> 256 -> K``).
* ``fused_linear``: PTLoss from hidden states (``N, H, V``), forward+backward.
* ``import``: ``import tgtfast`` over ``import torch``, in fresh processes taking turns (target <= 0.5 s).

For each op and shape, the rows are the eager reference (``eager``), ``torch.compile`` of it (``compile``;
absent where compiling makes no sense) and every backend of the package that can run the inputs. The rows take
turns, one call each per round (:func:`time_in_turns`), so that a change of load on a shared machine hits them
alike. Each row reports the median time with its min-max spread, on the CPU the minor page faults per call, the
speed-ups over eager and over ``torch.compile``, the achieved bytes per second against the copy bandwidth
measured in the same run (the memory roofline: the bytes the op cannot avoid moving, listed per op in
:data:`ROOFLINE_BYTES`), the cost per element of the work (flat when cost grows linearly), peak memory, and
whether the result matched the eager reference.

Peak memory on the CPU is measured in a fresh subprocess per row: after a warm-up on tiny inputs the real
inputs are built, the kernel's peak-RSS counter is reset (``/proc/self/clear_refs``), one call runs, and the
peak RSS (``VmHWM``) minus the RSS before it is reported. On a GPU it is ``torch.cuda.max_memory_allocated``
above what the inputs hold.

Sweeps (``--sweep``) run each op over a range of sizes (``SWEEPS``) to show how the cost grows; ``--plot``
draws time and the share of the roofline against the swept size.

Layout: :mod:`~tgtfast.bench.timing` (turns, page faults, copy bandwidth), :mod:`~tgtfast.bench.memory` (peak RSS
in a subprocess), :mod:`~tgtfast.bench.case` (:class:`Case`), one module per op (:mod:`~tgtfast.bench.ptloss`,
:mod:`~tgtfast.bench.proxy_solve`, :mod:`~tgtfast.bench.mlp_chain` for ``tgt``/``tgt_bwd``,
:mod:`~tgtfast.bench.fused_linear`, :mod:`~tgtfast.bench.import_time`), :mod:`~tgtfast.bench.registry` (builders,
shapes, sweeps, rooflines), :mod:`~tgtfast.bench.run` (:func:`run_case`), :mod:`~tgtfast.bench.report` (table,
environment, plot); the command line is :mod:`tgtfast.cli.bench`.
"""

from __future__ import annotations

from typing import List, Optional

from tgtfast.bench.case import GPU_BACKENDS, IMPLS, Case, backend_impls
from tgtfast.bench.import_time import TARGET_S as IMPORT_TARGET_S
from tgtfast.bench.import_time import run_import
# private helpers re-exported for the scripts that import them from here (benchmarks/bench_mlp_chain.py,
# benchmarks/bench_fused_linear.py, tests/test_bench.py)
from tgtfast.bench.memory import _peak_memory_child, _peak_memory_subprocess, _peak_rss_bytes, _rss_bytes
from tgtfast.bench.ptloss import available_impls, make_inputs, make_step
from tgtfast.bench.registry import BUILDERS, DEFAULT_SHAPES, OPS, ROOFLINE_BYTES, SWEEPS, op_available
from tgtfast.bench.report import device_name, environment, format_table, plot
from tgtfast.bench.run import run_case, run_ptloss
from tgtfast.bench.timing import _sync, copy_bandwidth, time_in_turns

__all__ = [
    "BUILDERS",
    "Case",
    "DEFAULT_SHAPES",
    "GPU_BACKENDS",
    "IMPLS",
    "IMPORT_TARGET_S",
    "OPS",
    "ROOFLINE_BYTES",
    "SWEEPS",
    "available_impls",
    "backend_impls",
    "copy_bandwidth",
    "device_name",
    "environment",
    "format_table",
    "main",
    "make_inputs",
    "make_step",
    "op_available",
    "plot",
    "run_case",
    "run_import",
    "run_ptloss",
    "time_in_turns",
]


def main(argv: Optional[List[str]] = None) -> int:
    """``tgtfast bench ...``, kept here for old callers: the command line lives in :mod:`tgtfast.cli.bench`."""
    from tgtfast.cli.bench import main as cli_main

    return cli_main(argv)
