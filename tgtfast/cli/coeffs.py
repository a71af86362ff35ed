"""``tgtfast coeffs``: PTLoss coefficients picked by the Proxy Teacher on a validation set."""

from __future__ import annotations

from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    from tgtfast.proxy import coeffs_main

    return coeffs_main(argv)
