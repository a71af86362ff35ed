"""Distillation losses (docs/design.md, "PTLoss", "Divergences" and "Fused linear PTLoss").

* :mod:`tgtfast.losses.divergence`: :func:`distill_loss`, the divergence menu (forward/reverse KL, JSD, skew KL,
  TVD, symmetric KL, AB-divergence, TAID) on the fused ``divergence`` op; one module per divergence in
  :mod:`tgtfast.losses.divergence_modules`;
* :mod:`tgtfast.losses.functional`: :func:`ptloss`, :func:`kd_loss`, :func:`focal_kd_loss` (validation, the
  backend call through :mod:`tgtfast.ops.ptloss`, the reduction);
* :mod:`tgtfast.losses.modules`: the ``nn.Module`` forms :class:`PTLoss`, :class:`KDLoss`,
  :class:`LabelSmoothedKDLoss`, :class:`FocalKDLoss`;
* :mod:`tgtfast.losses.fused_linear`: :func:`fused_linear_ptloss` / :class:`FusedLinearPTLoss`, from hidden
  states without materialising the logits.
"""

from tgtfast.losses.divergence import DIVERGENCES, distill_loss
from tgtfast.losses.divergence_modules import (
    ABDivergenceLoss,
    DistillLoss,
    ForwardKLLoss,
    JSDLoss,
    ReverseKLLoss,
    SkewKLLoss,
    SkewReverseKLLoss,
    SymmetricKLLoss,
    TAIDLoss,
    TVDLoss,
)
from tgtfast.losses.functional import focal_kd_loss, kd_loss, ptloss
from tgtfast.losses.sparse import SparseTeacher
from tgtfast.losses.taid import TAIDSchedule
from tgtfast.losses.modules import FocalKDLoss, KDLoss, LabelSmoothedKDLoss, PTLoss, coeffs_buffer

__all__ = [
    "distill_loss",
    "DIVERGENCES",
    "DistillLoss",
    "ForwardKLLoss",
    "ReverseKLLoss",
    "JSDLoss",
    "SkewKLLoss",
    "SkewReverseKLLoss",
    "TVDLoss",
    "SymmetricKLLoss",
    "ABDivergenceLoss",
    "TAIDLoss",
    "TAIDSchedule",
    "SparseTeacher",
    "fused_linear_distill_loss",
    "FusedLinearDistillLoss",
    "ptloss",
    "kd_loss",
    "focal_kd_loss",
    "PTLoss",
    "KDLoss",
    "LabelSmoothedKDLoss",
    "FocalKDLoss",
    "fused_linear_ptloss",
    "FusedLinearPTLoss",
    "default_chunk_size",
    "coeffs_buffer",
]


_LAZY = {
    "fused_linear_ptloss": "fused_linear",
    "FusedLinearPTLoss": "fused_linear",
    "default_chunk_size": "chunked",
    "fused_linear_distill_loss": "fused_linear_distill",
    "FusedLinearDistillLoss": "fused_linear_distill",
}


def __getattr__(name: str):
    # imported on first use: they import torch._dynamo (see tgtfast/__init__.py)
    import importlib

    if name in ("fused_linear", "fused_linear_distill", "chunked"):
        return importlib.import_module(f"tgtfast.losses.{name}")
    if name in _LAZY:
        return getattr(importlib.import_module(f"tgtfast.losses.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'tgtfast.losses' has no attribute {name!r}")
