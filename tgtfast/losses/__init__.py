"""Distillation losses (docs/design.md, "PTLoss" and "Fused linear PTLoss").

* :mod:`tgtfast.losses.functional`: :func:`ptloss`, :func:`kd_loss`, :func:`focal_kd_loss` (validation, the
  backend call through :mod:`tgtfast.ops.ptloss`, the reduction);
* :mod:`tgtfast.losses.modules`: the ``nn.Module`` forms :class:`PTLoss`, :class:`KDLoss`,
  :class:`LabelSmoothedKDLoss`, :class:`FocalKDLoss`;
* :mod:`tgtfast.losses.fused_linear`: :func:`fused_linear_ptloss` / :class:`FusedLinearPTLoss`, from hidden
  states without materialising the logits.
"""

from tgtfast.losses.functional import focal_kd_loss, kd_loss, ptloss
from tgtfast.losses.modules import FocalKDLoss, KDLoss, LabelSmoothedKDLoss, PTLoss, coeffs_buffer

__all__ = [
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


def __getattr__(name: str):
    # imported on first use: it imports torch._dynamo (see tgtfast/__init__.py)
    if name in ("fused_linear_ptloss", "FusedLinearPTLoss", "default_chunk_size", "fused_linear"):
        import importlib

        module = importlib.import_module("tgtfast.losses.fused_linear")
        return module if name == "fused_linear" else getattr(module, name)
    raise AttributeError(f"module 'tgtfast.losses' has no attribute {name!r}")
