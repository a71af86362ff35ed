"""Teacher Guided Training's perturb -> decode -> label step (docs/design.md, "TGT step").

* :mod:`tgtfast.tgt.step`: :func:`perturb_decode_label`, the counter-based :func:`latent_noise`, the fused
  :func:`perturb` and :func:`temperature_softmax`, and :func:`perturb_decode_label_mlp` (the fused MLP chain on
  parsed layers).
* :mod:`tgtfast.tgt.teacher`: the one parser of teacher parts (:func:`as_mlp`, :func:`why_not_mlp`).

The trainer that uses the step lives in :mod:`tgtfast.train`.
"""

from tgtfast.tgt.step import latent_noise, perturb, perturb_decode_label, perturb_decode_label_mlp, temperature_softmax
from tgtfast.tgt.teacher import ACTIVATIONS, Layer, TeacherPart, as_mlp, why_not_mlp

__all__ = [
    "latent_noise",
    "perturb",
    "temperature_softmax",
    "perturb_decode_label",
    "perturb_decode_label_mlp",
    "as_mlp",
    "why_not_mlp",
    "ACTIVATIONS",
    "Layer",
    "TeacherPart",
]
