"""``tgtfast train``: Teacher Guided Training of your own models from a YAML config."""

from __future__ import annotations

from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    from tgtfast.train_cli import train_main

    return train_main(argv)
