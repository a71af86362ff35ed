"""Time the Proxy Teacher coefficient search against a per-row SciPy baseline, in one run.

    python benchmarks/bench_proxy_solve.py [--n 10000] [--k 3] [--m 5] [--candidates 100] [--subsample 300] [--threads T]
                                 [--backends cpp reference]

Ours: ``search_coefficients`` (100 random candidates + KL, every candidate x row solved in float64, then Eq. 21),
once per backend: the fused C++ solve and the batched PyTorch reference. Baseline: what one writes without this package: for each (candidate, row) pair, ``scipy.optimize.minimize``
(BFGS on K-1 free logits) of the same objective L(p, q) (``minimize_scalar`` on q_0 when K = 2), timed on a random
subsample of pairs and extrapolated linearly to all ``C x N`` pairs. Also reports how far the baseline's solutions
are from ours (objective value and probabilities) on that subsample.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch


def load_proxy():
    from tgtfast import proxy

    return proxy


def objective_np(q, p, eta):
    m = np.arange(1, eta.shape[0] + 1)[:, None]
    pert = (eta * (1.0 - q)[None, :] ** m).sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.sum(np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0) + p * pert))


def scipy_solve(p, eta):
    """One row, one candidate: p [K], eta [M, K] -> q [K]."""
    from scipy.optimize import minimize, minimize_scalar

    k = p.shape[0]
    if k == 2:
        r = minimize_scalar(lambda a: objective_np(np.array([a, 1 - a]), p, eta), bounds=(1e-12, 1 - 1e-12),
                            method="bounded", options={"xatol": 1e-12})
        return np.array([r.x, 1 - r.x])

    def f(z):
        zz = np.append(z, 0.0)
        q = np.exp(zz - zz.max())
        return objective_np(q / q.sum(), p, eta)

    z0 = np.log(np.clip(p, 1e-300, None))
    z0 = z0[:-1] - z0[-1]
    r = minimize(f, z0, method="BFGS", options={"gtol": 1e-10})
    zz = np.append(r.x, 0.0)
    q = np.exp(zz - zz.max())
    return q / q.sum()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--m", type=int, default=5)
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--subsample", type=int, default=300, help="(candidate, row) pairs the baseline solves")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--backends", nargs="*", default=None, help="solve backends to time (default: cpp, reference)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    px = load_proxy()
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(args.n, args.k, generator=g, dtype=torch.float64) * 2.0, -1)
    y = torch.multinomial(p.float(), 1, generator=g)[:, 0]
    print(f"N={args.n} K={args.k} M={args.m} candidates={args.candidates} (+KL) torch {torch.__version__} "
          f"threads={torch.get_num_threads()}")

    import tgtfast

    names = args.backends or [b for b in ("cpp", "reference") if tgtfast.backends()[b] == "available"]
    results = {}
    for name in names:
        kw = dict(order=args.m, num_candidates=args.candidates, seed=0, backend=name)
        px.search_coefficients(p[:100], y[:100], **kw)  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            res = px.search_coefficients(p, y, **kw)
            times.append(time.perf_counter() - t0)
        results[name] = (float(np.median(times)), res)
        print(f"search_coefficients backend={name}: median {results[name][0]:.3f} s over {args.repeats} runs "
              f"(min {min(times):.3f}, max {max(times):.3f}); best D {res.deviation:.6f} (KL {res.kl_deviation:.6f}, "
              f"candidate {res.best_index})")
    ours, res = results[names[0]]
    if len(results) > 1:
        base = results[names[-1]][1]
        diff = float((res.candidate_deviations - base.candidate_deviations).abs().max())
        print(f"{names[0]} vs {names[-1]}: max |D difference| over candidates {diff:.2e}; "
              f"time ratio {results[names[-1]][0] / ours:.1f}x")

    # baseline on a random subsample of (candidate, row) pairs, extrapolated to all of them
    cands = res.candidates if res.per_class else res.candidates[:, :, None].expand(-1, -1, args.k)
    c_all = cands.shape[0]
    rng = np.random.default_rng(0)
    pick = rng.choice(c_all * args.n, size=min(args.subsample, c_all * args.n), replace=False)
    ci, ni = pick // args.n, pick % args.n
    pn, en = p.numpy(), cands.numpy()
    t0 = time.perf_counter()
    qs = [scipy_solve(pn[n], en[c]) for c, n in zip(ci, ni)]
    t_sub = time.perf_counter() - t0
    per_pair = t_sub / len(pick)
    extrap = per_pair * c_all * args.n
    print(f"scipy per-row baseline: {len(pick)} pairs in {t_sub:.2f} s = {per_pair * 1e3:.3f} ms/pair -> "
          f"{extrap:.1f} s extrapolated to {c_all} x {args.n} pairs")
    print(f"speed-up of backend={names[0]} over the baseline: {extrap / ours:.0f}x")
    # agreement on the subsample
    q_ours = torch.stack([px.proxy_teacher(p[n : n + 1], cands[c], backend=names[0])[0] for c, n in zip(ci[:50], ni[:50])]).numpy()
    dq = max(float(np.abs(q_ours[i] - qs[i]).max()) for i in range(len(q_ours)))
    df = max(objective_np(q_ours[i], pn[n], en[c]) - objective_np(qs[i], pn[n], en[c])
             for i, (c, n) in enumerate(zip(ci[:50], ni[:50])))
    print(f"agreement on 50 pairs: max |q_ours - q_scipy| = {dq:.2e}, max L(ours) - L(scipy) = {df:.2e} "
          f"(negative: ours lower)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
