"""``tgtfast bench``: every op against eager PyTorch, torch.compile and the memory roofline."""

from __future__ import annotations

from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    from tgtfast.bench import main as bench_main

    return bench_main(argv)
