"""tgtfast: fused kernels for knowledge distillation.

* :func:`distill_loss`: the divergences distillation uses (forward/reverse KL, JSD, skew KL, TVD, symmetric KL,
  AB-divergence, TAID), fused, with one module each (:class:`JSDLoss`, ...), and
  :func:`fused_linear_distill_loss` from hidden states.
* :class:`SparseTeacher`: distil from cached top-k teacher outputs; :class:`TeacherCache` writes and reads them
  (``tgtfast cache-teacher``), :class:`CachedTeacherDataset` / :class:`TeacherCollator` join them to batches.
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
* :mod:`tgtfast.imperfect`: distillation from an imperfect teacher: the teacher's reliability on a labelled
  split (:class:`TeacherReliability`), weighted distillation, SLaM (:func:`slam_loss`) and robust active selection
  of teacher queries (:class:`RobustActiveSelector`); :mod:`tgtfast.metrics`: accuracy, NLL and calibration error.
* :func:`backends`: which implementations this machine can run, and why not the others;
  :func:`empty_cpu_cache` frees the output blocks the C++ ops keep for reuse.
* :mod:`tgtfast.reference`: the eager PyTorch specification every backend is tested against.
"""

import importlib.util as _importlib_util
import os as _os
import sys as _sys


def _checkout_kernels() -> None:
    """An install ships the Triton kernels (``kernels/`` at the top of the source tree) as ``tgtfast.kernels``;
    let a source checkout import them under the same name."""
    here = _os.path.dirname(_os.path.abspath(__file__))
    kernels = _os.path.join(_os.path.dirname(here), "kernels")
    init = _os.path.join(kernels, "__init__.py")
    if "tgtfast.kernels" in _sys.modules or _os.path.isdir(_os.path.join(here, "kernels")) or not _os.path.isfile(init):
        return
    if _importlib_util.find_spec("tgtfast.kernels") is not None:  # an editable install maps it already
        return
    spec = _importlib_util.spec_from_file_location("tgtfast.kernels", init, submodule_search_locations=[kernels])
    module = _importlib_util.module_from_spec(spec)
    _sys.modules["tgtfast.kernels"] = module
    spec.loader.exec_module(module)


_checkout_kernels()

from tgtfast import ops, reference  # noqa: E402  (ops registers every op with the dispatcher)
from tgtfast._ext import empty_cpu_cache  # noqa: E402
from tgtfast.dispatch import Backend, backends  # noqa: E402
from tgtfast.losses import FocalKDLoss, KDLoss, LabelSmoothedKDLoss, PTLoss, focal_kd_loss, kd_loss, ptloss  # noqa: E402,I001
from tgtfast.losses import (  # noqa: E402
    DIVERGENCES,
    ABDivergenceLoss,
    DistillLoss,
    ForwardKLLoss,
    JSDLoss,
    ReverseKLLoss,
    SkewKLLoss,
    SkewReverseKLLoss,
    SymmetricKLLoss,
    TAIDLoss,
    SparseTeacher,
    TAIDSchedule,
    TVDLoss,
    distill_loss,
)
from tgtfast.proxy import (  # noqa: E402
    CoefficientSearchResult,
    deviation,
    proxy_teacher,
    search_coefficients,
    stationarity_residual,
)
from tgtfast import imperfect, metrics  # noqa: E402
from tgtfast.imperfect import (  # noqa: E402
    MonotoneCurve,
    RobustActiveSelector,
    SLaMLoss,
    TeacherReliability,
    WeightedDistillLoss,
    debiasing_weights,
    robust_query_probabilities,
    select_queries,
    slam_loss,
    student_informativeness,
    weighted_distill_loss,
)
from tgtfast.tgt import latent_noise, perturb, perturb_decode_label, temperature_softmax  # noqa: E402
from tgtfast.train import ShortRunWarning, TGTConfig, TGTHistory, TGTTrainer  # noqa: E402

# Former module paths, kept so ``tgtfast.functional.ptloss`` and the like still resolve after ``import tgtfast``.
from tgtfast import _mlp, functional, trainer  # noqa: E402,F401

# The fused linear loss is imported on first use (see tgtfast/losses/__init__.py): it marks itself a graph break
# for torch.compile, which imports torch._dynamo (about a second); ``import tgtfast`` stays within half a second
# of ``import torch``.
_LAZY = ("fused_linear_ptloss", "FusedLinearPTLoss", "fused_linear", "fused_linear_distill_loss",
         "FusedLinearDistillLoss")


# The teacher cache (tgtfast/cache/), imported on first use.
_CACHE = ("TeacherCache", "TeacherCacheWriter", "CachedTeacherDataset", "TeacherCollator", "CacheError")


def __getattr__(name: str):
    if name in _CACHE:
        from tgtfast import cache

        globals()[name] = getattr(cache, name)
        return globals()[name]
    if name not in _LAZY:
        raise AttributeError(f"module 'tgtfast' has no attribute {name!r}")
    if name == "fused_linear":
        import tgtfast.fused_linear as value  # the former module path
    else:
        from tgtfast import losses

        value = getattr(losses, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_CACHE))


__version__ = "0.1.0"

__all__ = [
    "Backend",
    "backends",
    "empty_cpu_cache",
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
    "TeacherCache",
    "TeacherCacheWriter",
    "CachedTeacherDataset",
    "TeacherCollator",
    "CacheError",
    "TeacherReliability",
    "MonotoneCurve",
    "debiasing_weights",
    "weighted_distill_loss",
    "WeightedDistillLoss",
    "slam_loss",
    "SLaMLoss",
    "student_informativeness",
    "robust_query_probabilities",
    "select_queries",
    "RobustActiveSelector",
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
    "reference",
    "proxy_teacher",
    "deviation",
    "stationarity_residual",
    "search_coefficients",
    "CoefficientSearchResult",
    "TGTConfig",
    "TGTTrainer",
    "ShortRunWarning",
    "TGTHistory",
    "latent_noise",
    "perturb",
    "temperature_softmax",
    "perturb_decode_label",
]
