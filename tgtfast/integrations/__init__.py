"""Drop-ins for the Hugging Face ecosystem: code written against TRL, Liger-Kernel or transformers switches to
tgtfast's fused kernels by changing an import.

* :mod:`tgtfast.integrations.trl`: ``generalized_jsd_loss``, TRL's ``GKDTrainer.generalized_jsd_loss`` (same
  arguments, value and gradients).
* :mod:`tgtfast.integrations.liger`: ``FusedLinearJSDLoss`` (alias ``LigerFusedLinearJSDLoss``) and
  ``liger_fused_linear_jsd``, Liger-Kernel's chunked fused-linear JSD loss.
* :mod:`tgtfast.integrations.transformers`: a distillation ``Trainer``.

Each submodule is imported on first access (``tgtfast.integrations.trl``): importing this package imports none of
them, and none of trl, liger-kernel or transformers. The loss drop-ins do not need their peer library installed.
"""

from __future__ import annotations

import importlib

_SUBMODULES = ("trl", "liger", "transformers")

__all__ = list(_SUBMODULES)


def __getattr__(name: str):
    if name not in _SUBMODULES:
        raise AttributeError(f"module 'tgtfast.integrations' has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{name}")
    globals()[name] = module
    return module


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES))
