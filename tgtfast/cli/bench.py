"""``tgtfast bench``: every op against eager PyTorch, torch.compile and the memory roofline (the argument
parsing; the harness is :mod:`tgtfast.bench`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List, Optional, Sequence


def _parse_shape(items: Sequence[str]) -> Dict[str, int]:
    out = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or not key or not val.lstrip("-").isdigit():
            raise SystemExit(f"tgtfast bench: --shape takes KEY=INT entries, got {item!r}")
        out[key.upper()] = int(val)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    """``tgtfast bench [--op OP ...] [--shape KEY=INT ...] [--sweep] [--repeats R] [--json F] [--plot F] ...``"""
    import torch

    from tgtfast.bench import (BUILDERS, DEFAULT_SHAPES, IMPLS, OPS, SWEEPS, environment, format_table,
                               op_available, plot, run_case)

    parser = argparse.ArgumentParser(prog="tgtfast bench", description="Benchmark the fused ops of tgtfast.")
    parser.add_argument("--op", nargs="+", choices=list(OPS),
                        help="ops to run (default: all available; 'import' times import tgtfast over import torch)")
    parser.add_argument("--shape", nargs="+", default=[], metavar="KEY=INT",
                        help="override shape entries, e.g. --shape N=64 K=4096 (per op: see DEFAULT_SHAPES)")
    parser.add_argument("--n", type=int, help="PTLoss rows N (same as --shape N=...)")
    parser.add_argument("--k", type=int, nargs="+", help="PTLoss classes K; several values run one after another")
    parser.add_argument("--m", type=int, help="PTLoss orders M")
    parser.add_argument("--sweep", action="store_true", help="run each op over the sizes in SWEEPS")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds per shape (default 7; the import op: fresh processes per module, default 5)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--impl", nargs="+", choices=IMPLS, help="implementations to run (default: all available)")
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--plot", help="write a PNG of time and roofline share against the swept size")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    dtype = getattr(torch, args.dtype)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ops = args.op or list(OPS)
    override = _parse_shape(args.shape)
    ptloss_flags = {key: val for key, val in (("N", args.n), ("M", args.m)) if val is not None}
    results = []
    for op in ops:
        why = op_available(op)
        if why is not None:
            print(f"{op}: skipped ({why})\n", flush=True)
            continue
        if op == "import":  # no shape, no sweep: fresh processes importing torch, then tgtfast
            res = run_case(op, {}, repeats=5 if args.repeats is None else args.repeats)
            print(format_table(res) + "\n", flush=True)
            results.append(res)
            continue
        defaults = DEFAULT_SHAPES[op][device.type == "cuda"]
        if args.sweep:
            fixed, key, sizes = SWEEPS[op]
            shapes = [{**defaults[0], **fixed, key: size} for size in sizes]
        else:
            shapes = [dict(s) for s in defaults]
        if op == "ptloss":
            shapes = [{**s, **ptloss_flags} for s in shapes]
            if args.k:
                shapes = [{**s, "K": k} for s in shapes[:1] for k in args.k]
        swept = SWEEPS[op][1] if args.sweep else None
        shapes = [{**s, **{k: v for k, v in override.items() if k in s and k != swept}} for s in shapes]
        shapes = list({tuple(sorted(s.items())): s for s in shapes}.values())  # an override may make them equal
        for shape in shapes:
            res = run_case(op, shape, dtype, device, 7 if args.repeats is None else args.repeats,
                           not args.no_memory, args.impl)
            print(format_table(res) + "\n", flush=True)
            results.append(res)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"environment": environment(), "results": results}, fh, indent=2)
    if args.plot and any(r["op"] in BUILDERS for r in results):
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
