"""``tgtfast demo``: Teacher Guided Training with few labels on scikit-learn's digits."""

from __future__ import annotations

from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    from tgtfast.demo import demo_main

    return demo_main(argv)
