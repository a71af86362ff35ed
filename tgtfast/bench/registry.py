"""The ops of ``tgtfast bench``: their case builders, the roofline each is measured against, default shapes
and sweeps. The ``import`` op (fresh-process import time) has no case, shape or sweep: it is listed in
:data:`OPS` only."""

from __future__ import annotations

from typing import Callable, Dict, Optional

import tgtfast
from tgtfast.bench.case import Case
from tgtfast.bench.divergence import _case_divergence
from tgtfast.bench.fused_linear import _case_fused_linear
from tgtfast.bench.mlp_chain import _case_tgt
from tgtfast.bench.proxy_solve import _case_proxy
from tgtfast.bench.ptloss import _case_ptloss
from tgtfast.bench.sparse import _case_sparse

# What each op must move at the least, the basis of the roofline column.
ROOFLINE_BYTES = {
    "ptloss": "read student and teacher logits, write the gradient: 3 N K bytes-per-element",
    "divergence": "read student and teacher logits, write the gradient: 3 N K bytes-per-element",
    "sparse": "read the student logits twice (forward, backward), write the gradient: 3 N V bytes-per-element",
    "proxy": "none (compute-bound: the inputs are N K float64); no roofline",
    "tgt": "read z and the weights, write x_new and the soft labels",
    "tgt_bwd": "tgt plus read the incoming gradients and write the gradient of z",
    "fused_linear": "read both hidden states and weights, write the student's hidden-state and weight gradients",
    "import": "none (fresh-process import time, not a kernel); no roofline",
}


BUILDERS: Dict[str, Callable[..., Case]] = {
    "ptloss": _case_ptloss,
    "divergence": _case_divergence,
    "sparse": _case_sparse,
    "proxy": _case_proxy,
    "tgt": lambda shape, dtype, device, impls: _case_tgt(shape, dtype, device, impls, backward=False),
    "tgt_bwd": lambda shape, dtype, device, impls: _case_tgt(shape, dtype, device, impls, backward=True),
    "fused_linear": _case_fused_linear,
}

# Every op `tgtfast bench --op` takes: the cases above and the import time (:mod:`tgtfast.bench.import_time`),
# which runs fresh processes instead of a Case.
OPS = (*BUILDERS, "import")

# The shapes the op issues set targets on: (CPU shapes, GPU shapes).
DEFAULT_SHAPES = {
    "ptloss": ([{"N": 1024, "K": 32000, "M": 5}], [{"N": 4096, "K": 32000, "M": 5}, {"N": 4096, "K": 128256, "M": 5}]),
    # D: the index in tgtfast.DIVERGENCES (every divergence of the menu)
    "divergence": ([{"N": 1024, "K": 32000, "D": d} for d in range(9)],
                   [{"N": 4096, "K": 128256, "D": d} for d in range(9)]),
    "sparse": ([{"N": 8192, "V": 32000, "TOPK": 64}], [{"N": 8192, "V": 128256, "TOPK": 64}]),
    "proxy": ([{"N": 10000, "K": 3, "M": 5, "C": 100}],) * 2,
    "tgt": ([{"B": 4096, "D": 64, "X": 784, "K": 10}, {"B": 4096, "D": 64, "X": 784, "K": 1000}],) * 2,
    "tgt_bwd": ([{"B": 4096, "D": 64, "X": 784, "K": 10}, {"B": 4096, "D": 64, "X": 784, "K": 1000}],) * 2,
    "fused_linear": ([{"N": 4096, "H": 1024, "V": 32000}], [{"N": 8192, "H": 4096, "V": 128256}]),
}

# Sizes a sweep runs through (the other entries stay at a small base so a sweep takes minutes, not hours).
SWEEPS = {
    "ptloss": ({"N": 256, "M": 5}, "K", [1024, 4096, 16384, 32000, 65536]),
    "divergence": ({"N": 256, "D": 2}, "K", [1024, 4096, 16384, 32000, 65536]),
    "sparse": ({"N": 1024, "TOPK": 64}, "V", [4096, 16384, 32000, 65536]),
    "proxy": ({"K": 3, "M": 5, "C": 100}, "N", [1000, 3000, 10000]),
    "tgt": ({"D": 64, "X": 784, "K": 10}, "B", [512, 1024, 2048, 4096]),
    "tgt_bwd": ({"D": 64, "X": 784, "K": 10}, "B", [512, 1024, 2048, 4096]),
    "fused_linear": ({"N": 512, "H": 256}, "V", [4096, 8192, 16384, 32000]),
}


def op_available(op: str) -> Optional[str]:
    """None if `op` exists in this installation, else why not."""
    needs = {"tgt": "perturb_decode_label", "tgt_bwd": "perturb_decode_label", "fused_linear": "fused_linear_ptloss"}
    if op in needs and not hasattr(tgtfast, needs[op]):
        return f"tgtfast.{needs[op]} is not available"
    return None
