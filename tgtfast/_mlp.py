"""Former home of the fused MLP chain, kept so old imports work: the op is :mod:`tgtfast.ops.mlp_chain`, the
teacher parser :mod:`tgtfast.tgt.teacher` and the entry point :func:`tgtfast.tgt.perturb_decode_label_mlp`."""

from tgtfast.ops.mlp_chain import OP  # noqa: F401
from tgtfast.tgt.step import perturb_decode_label_mlp  # noqa: F401
from tgtfast.tgt.teacher import ACTIVATIONS, Layer, as_mlp, why_not_mlp  # noqa: F401

__all__ = ["ACTIVATIONS", "Layer", "as_mlp", "why_not_mlp", "perturb_decode_label_mlp"]
