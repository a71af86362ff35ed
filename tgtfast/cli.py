"""The ``tgtfast`` command line: ``tgtfast demo ...``, ``tgtfast bench ...``, ``tgtfast coeffs ...``,
``tgtfast backends``."""

from __future__ import annotations

import json
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "demo": "Teacher Guided Training with few labels on the digits data (the package's main job)",
        "bench": "benchmark the fused ops",
        "coeffs": "search PTLoss coefficients with the Proxy Teacher",
        "backends": "list the backends and why some are off",
        "train": "Teacher Guided Training from a YAML config (--help-config documents its keys)",
    }
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: tgtfast {" + ",".join(commands) + "} [options]")
        for name, what in commands.items():
            print(f"  {name:<10}{what}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        from tgtfast.demo import demo_main

        return demo_main(rest)
    if cmd == "bench":
        from tgtfast.bench import main as bench_main

        return bench_main(rest)
    if cmd == "coeffs":
        from tgtfast.proxy import coeffs_main

        return coeffs_main(rest)
    if cmd == "train":
        from tgtfast.train_cli import train_main

        return train_main(rest)
    import tgtfast

    print(json.dumps(tgtfast.backends(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
