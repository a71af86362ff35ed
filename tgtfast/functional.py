"""Former home of the functional losses, kept so old imports work: see :mod:`tgtfast.losses.functional`."""

from tgtfast.losses.functional import CoeffsLike, focal_kd_loss, kd_loss, ptloss  # noqa: F401

__all__ = ["ptloss", "kd_loss", "focal_kd_loss"]
