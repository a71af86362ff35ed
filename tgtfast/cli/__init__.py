"""The ``tgtfast`` command line: one module per sub-command (``tgtfast/cli/<command>.py``, each with a
``main(argv) -> exit code``), imported only when its command runs."""

from __future__ import annotations

import importlib
import sys
from typing import List, Optional

COMMANDS = {
    "demo": "Teacher Guided Training with few labels on the digits data (the package's main job)",
    "bench": "benchmark the fused ops",
    "coeffs": "search PTLoss coefficients with the Proxy Teacher",
    "backends": "list the backends and why some are off",
    "train": "Teacher Guided Training from a YAML config (--help-config documents its keys)",
    "cache-teacher": "store a teacher's top-k log-probabilities per token over a dataset (offline distillation)",
    "distill": "distil a Hugging Face causal LM into another from a YAML config (transformers Trainer)",
}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: tgtfast {" + ",".join(COMMANDS) + "} [options]")
        for name, what in COMMANDS.items():
            print(f"  {name:<14}{what}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"tgtfast.cli.{argv[0].replace('-', '_')}")
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
