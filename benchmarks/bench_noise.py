"""Time the TGT latent perturbation and the temperature softmax against their eager counterparts, in one run.

    python benchmarks/bench_noise.py [--n 4096] [--d 512] [--k 1000] [--repeats 7] [--threads T]

Rows (median of ``repeats`` timed calls after one warm-up, min-max in brackets):

* perturb ``z + sigma * noise`` for ``z [n, d]`` float32:
  ``eager-philox`` (``tgtfast.reference.perturb``: the same counter-based noise written with torch ops),
  ``torch.randn`` (``z + sigma * torch.randn_like(z)``: torch's own generator, a stored noise tensor, not
  reproducible across backends; the speed a user gets without this package) and every available fused backend;
* the temperature softmax of ``[n, k]`` logits: ``torch.softmax(x / T)`` against every fused backend;
* ``dst.copy_(src)`` of ``z``: the memory roofline of an op that reads ``z`` once and writes once.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import tgtfast
from tgtfast import reference


def timeit(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, min(times) * 1e3, max(times) * 1e3


def row(name, stats, numel, base=None):
    med, lo, hi = stats
    speed = f"  x{base / med:6.2f} vs eager" if base else ""
    print(f"  {name:<22} {med:9.3f} ms  [{lo:.3f}-{hi:.3f}]  {numel / med / 1e6:7.3f} Gelem/s{speed}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu_backends = [b for b in ("cpp",) if tgtfast.backends()[b] == "available"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, backends {tgtfast.backends()}")

    z = torch.randn(args.n, args.d)
    numel = z.numel()
    print(f"perturb z [{args.n}, {args.d}] float32, sigma 0.5")
    dst = torch.empty_like(z)
    copy = timeit(lambda: dst.copy_(z), args.repeats)
    row("copy (roofline)", copy, numel)
    eager = timeit(lambda: reference.perturb(z, 0.5, 1234, 0), args.repeats)
    row("eager-philox", eager, numel)
    row("torch.randn", timeit(lambda: z + 0.5 * torch.randn_like(z), args.repeats), numel, eager[0])
    for b in cpu_backends:
        out = tgtfast.perturb(z, 0.5, 1234, 0, backend=b)
        err = (out - reference.perturb(z, 0.5, 1234, 0)).abs().max().item()
        row(f"{b} (max err {err:.1e})", timeit(lambda b=b: tgtfast.perturb(z, 0.5, 1234, 0, backend=b), args.repeats),
            numel, eager[0])

    x = torch.randn(args.n, args.k) * 3
    print(f"temperature softmax [{args.n}, {args.k}] float32, T 2")
    sm_eager = timeit(lambda: torch.softmax(x / 2.0, -1), args.repeats)
    row("torch.softmax(x / T)", sm_eager, x.numel())
    for b in cpu_backends:
        row(b, timeit(lambda b=b: tgtfast.temperature_softmax(x, 2.0, backend=b), args.repeats), x.numel(),
            sm_eager[0])


if __name__ == "__main__":
    main()
