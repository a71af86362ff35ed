"""Former home of the fused linear loss, kept so old imports work: see :mod:`tgtfast.losses.fused_linear`."""

from tgtfast.losses.fused_linear import FusedLinearPTLoss, default_chunk_size, fused_linear_ptloss  # noqa: F401

__all__ = ["fused_linear_ptloss", "FusedLinearPTLoss", "default_chunk_size"]
