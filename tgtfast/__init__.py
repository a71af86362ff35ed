"""tgtfast: fused kernels for knowledge distillation.

* :func:`ptloss` / :class:`PTLoss`: the perturbed KL distillation loss, loss and gradients in one fused pass
  (C++ on the CPU, CUDA and Triton on the GPU), with the baselines :class:`KDLoss`,
  :class:`LabelSmoothedKDLoss` and :class:`FocalKDLoss`.
* :func:`proxy_teacher` / :func:`search_coefficients`: the Proxy Teacher, which picks PTLoss coefficients on a
  validation set (``tgtfast coeffs`` on the command line).
* :func:`backends`: which implementations this machine can run, and why not the others.
* :mod:`tgtfast.reference`: the eager PyTorch specification every backend is tested against.
"""

from tgtfast import _mlp, reference  # _mlp registers the fused MLP chain with the dispatcher
from tgtfast.dispatch import Backend, backends
from tgtfast.functional import focal_kd_loss, kd_loss, ptloss
from tgtfast.losses import FocalKDLoss, KDLoss, LabelSmoothedKDLoss, PTLoss
from tgtfast.proxy import (
    CoefficientSearchResult,
    deviation,
    proxy_teacher,
    search_coefficients,
    stationarity_residual,
)

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "backends",
    "ptloss",
    "kd_loss",
    "focal_kd_loss",
    "PTLoss",
    "KDLoss",
    "LabelSmoothedKDLoss",
    "FocalKDLoss",
    "reference",
    "proxy_teacher",
    "deviation",
    "stationarity_residual",
    "search_coefficients",
    "CoefficientSearchResult",
]
