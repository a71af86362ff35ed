"""``tgtfast demo``: Teacher Guided Training with few labels on scikit-learn's digits (the argument parsing; the
demo itself is :func:`tgtfast.demo.run_demo`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, Optional, Sequence


def _int_at_least(low: int, what: str):
    """An argparse type: an integer >= `low` (`what` names the expectation in the error)."""

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return v

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``tgtfast demo [--quick] [--seeds 0 1 2] [--budgets 20 50 100] [--out DIR] [--cache-dir DIR] ...``"""
    from tgtfast.demo import LOSSES, METHODS, DemoConfig, run_demo
    from tgtfast.demo.config import REGIMES

    ap = argparse.ArgumentParser(
        prog="tgtfast demo",
        description="Teacher Guided Training with few labels on scikit-learn's digits: trains (or loads) the "
                    "teacher, trains students by one-hot training, distillation, TGT random and TGT gradient with "
                    "KL and PTLoss; then, with an overconfident teacher trained on few labels, compares weighted "
                    "distillation, SLaM, robust active selection and PTLoss with KL at a temperature picked on "
                    "validation; prints the tables and writes results.json and results.png.")
    ap.add_argument("--quick", action="store_true", help="small run: budget 20, 3 seeds, fewer steps")
    ap.add_argument("--seeds", type=_non_negative_int, nargs="+", help="student seeds (default 0 1 2)")
    ap.add_argument("--budgets", type=_positive_int, nargs="+",
                    help="labelled examples per student run, in total, stratified (default 20 50 100)")
    ap.add_argument("--methods", nargs="+", choices=METHODS, help=f"default: all of {' '.join(METHODS)}")
    ap.add_argument("--losses", nargs="+", choices=LOSSES, help="distillation losses (default kl ptloss)")
    ap.add_argument("--steps", type=_positive_int, help="optimiser steps per student")
    ap.add_argument("--regimes", nargs="+", choices=REGIMES,
                    help="strong: the teacher trained on every label; weak: the overconfident teacher trained on few "
                         "labels (default: both)")
    ap.add_argument("--out", default="tgtfast-demo", help="directory for results.json and results.png")
    ap.add_argument("--cache-dir", default=None,
                    help="teacher checkpoint cache (default ~/.cache/tgtfast/demo, or $XDG_CACHE_HOME/tgtfast/demo)")
    ap.add_argument("--no-cache", action="store_true", help="train the teacher afresh and do not save it")
    ap.add_argument("--jobs", type=_positive_int, default=None,
                    help="student runs in parallel processes (default: min(2, CPU count))")
    ap.add_argument("--threads", type=_positive_int, default=1, help="torch threads per process (default 1)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    overrides: Dict[str, Any] = {}
    for name in ("seeds", "budgets", "methods", "losses", "regimes"):
        v = getattr(args, name)
        if v is not None:
            overrides[name] = tuple(dict.fromkeys(v))
    if args.steps is not None:
        overrides["steps"] = args.steps
    try:
        cfg = DemoConfig.quick(**overrides) if args.quick else DemoConfig(**overrides)
        cfg.validate()
        result = run_demo(cfg, args.out, cache_dir=args.cache_dir, use_cache=not args.no_cache, jobs=args.jobs,
                          threads=args.threads, progress=not args.no_progress)
    except (ValueError, TypeError, OSError) as exc:
        print(f"tgtfast demo: error: {exc}", file=sys.stderr)
        return 2
    print()
    print(result["table"])
    print()
    print(f"wrote {result['files']['json']} and {result['files']['png']} "
          f"({result['seconds']['total']:.0f} s: teacher {result['seconds']['teacher']:.0f} s, "
          f"students {result['seconds']['students']:.0f} s on {result['jobs']} process"
          f"{'es' if result['jobs'] > 1 else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
