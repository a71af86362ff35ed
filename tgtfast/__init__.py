"""tgtfast: fused kernels for knowledge distillation.

* :func:`ptloss` / :class:`PTLoss`: the perturbed KL distillation loss, loss and gradients in one fused pass
  (C++ on the CPU, CUDA and Triton on the GPU), with the baselines :class:`KDLoss`,
  :class:`LabelSmoothedKDLoss` and :class:`FocalKDLoss`.
* :func:`fused_linear_ptloss` / :class:`FusedLinearPTLoss`: PTLoss (plus an optional cross-entropy term)
  straight from hidden states and output projections, chunk by chunk, without materialising the logits.
* :func:`proxy_teacher` / :func:`search_coefficients`: the Proxy Teacher, which picks PTLoss coefficients on a
  validation set (``tgtfast coeffs`` on the command line).
* :class:`TGTTrainer` / :class:`TGTConfig`: Teacher Guided Training of a student from a frozen teacher
  generator and labeler (``tgtfast train`` on the command line).
* :func:`perturb_decode_label`: Teacher Guided Training's perturb -> decode -> label step, with the counter-based
  noise :func:`latent_noise`, the fused :func:`perturb` and :func:`temperature_softmax`.
* :func:`backends`: which implementations this machine can run, and why not the others;
  :func:`empty_cpu_cache` frees the output blocks the C++ ops keep for reuse.
* :mod:`tgtfast.reference`: the eager PyTorch specification every backend is tested against.
"""

from tgtfast import _mlp, reference  # _mlp registers the fused MLP chain with the dispatcher
from tgtfast._ext import empty_cpu_cache
from tgtfast.dispatch import Backend, backends
from tgtfast.functional import focal_kd_loss, kd_loss, ptloss
from tgtfast.fused_linear import FusedLinearPTLoss, fused_linear_ptloss
from tgtfast.losses import FocalKDLoss, KDLoss, LabelSmoothedKDLoss, PTLoss
from tgtfast.proxy import (
    CoefficientSearchResult,
    deviation,
    proxy_teacher,
    search_coefficients,
    stationarity_residual,
)
from tgtfast.trainer import TGTConfig, TGTHistory, TGTTrainer
from tgtfast.tgt import latent_noise, perturb, perturb_decode_label, temperature_softmax

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "backends",
    "empty_cpu_cache",
    "ptloss",
    "kd_loss",
    "focal_kd_loss",
    "PTLoss",
    "KDLoss",
    "LabelSmoothedKDLoss",
    "FocalKDLoss",
    "fused_linear_ptloss",
    "FusedLinearPTLoss",
    "reference",
    "proxy_teacher",
    "deviation",
    "stationarity_residual",
    "search_coefficients",
    "CoefficientSearchResult",
    "TGTConfig",
    "TGTTrainer",
    "TGTHistory",
    "latent_noise",
    "perturb",
    "temperature_softmax",
    "perturb_decode_label",
]
