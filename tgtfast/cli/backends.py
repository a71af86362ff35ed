"""``tgtfast backends``: which backends this machine can run, and why not the others (JSON)."""

from __future__ import annotations

import json
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    import tgtfast

    parser = argparse.ArgumentParser(prog="tgtfast backends", description=__doc__)
    parser.add_argument("--op", default=None, help="answer for one op (e.g. ptloss, perturb_decode_label_mlp)")
    args = parser.parse_args(list(argv or []))
    print(json.dumps(tgtfast.backends(args.op), indent=2))
    return 0
