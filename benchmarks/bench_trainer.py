"""Throughput of TGTTrainer per exploration mode, on MLP teachers (the fused perturb -> decode -> label path).

    python benchmarks/bench_trainer.py [--n 4096] [--batch 256] [--steps 20] [--threads T] [--modes none random gradient]

Teacher: encoder 784 -> 256 -> 64, decoder 64 -> 256 -> 784 (sigmoid), labeler 784 -> 256 -> 10; student
784 -> 64 -> 10; random data. Reports, per mode, the time per optimiser step (median over the timed steps after
2 warm-up steps), training examples per second and all samples (examples plus generated) per second, as the
trainer's own metrics record them, plus the one-off set-up time (shape checks and the teacher cache: the run's time outside its steps).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import tgtfast


def models(d_in: int, latent: int, k: int):
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(d_in, 256), nn.ReLU(), nn.Linear(256, latent))
    decoder = nn.Sequential(nn.Linear(latent, 256), nn.ReLU(), nn.Linear(256, d_in), nn.Sigmoid())
    labeler = nn.Sequential(nn.Linear(d_in, 256), nn.ReLU(), nn.Linear(256, k))
    student = nn.Sequential(nn.Linear(d_in, 64), nn.ReLU(), nn.Linear(64, k))
    return student, labeler, decoder, encoder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--samples", type=int, default=1, help="samples_per_example")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--modes", nargs="+", default=["none", "random", "gradient"])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    d_in, latent, k = 784, 64, 10
    g = torch.Generator().manual_seed(1)
    x = torch.rand(args.n, d_in, generator=g)
    y = torch.randint(0, k, (args.n,), generator=g)
    fused = hasattr(tgtfast, "perturb_decode_label")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, perturb_decode_label: "
          f"{'tgtfast' if fused else 'eager fallback'}, n={args.n}, batch={args.batch}, "
          f"samples_per_example={args.samples}")
    print(f"{'mode':<10}{'ms/step':>10}{'examples/s':>14}{'samples/s':>13}{'setup s':>10}")
    for mode in args.modes:
        student, labeler, decoder, encoder = models(d_in, latent, k)
        cfg = tgtfast.TGTConfig(exploration=mode, sigma=0.5, samples_per_example=args.samples, explore_steps=3,
                                batch_size=args.batch, max_steps=args.steps + 2, log_every=1, progress=False)
        trainer = tgtfast.TGTTrainer(student, labeler, decoder=decoder, encoder=encoder, config=cfg)
        t0 = time.perf_counter()
        hist = trainer.fit((x, y))
        total = time.perf_counter() - t0
        recs = hist.train[2:]
        ms = statistics.median(1000.0 * args.batch / r["examples_per_s"] for r in recs)
        ex = statistics.median(r["examples_per_s"] for r in recs)
        sa = statistics.median(r["samples_per_s"] for r in recs)
        step_time = sum(1.0 / r["examples_per_s"] * args.batch for r in hist.train)
        print(f"{mode:<10}{ms:>10.1f}{ex:>14.0f}{sa:>13.0f}{total - step_time:>10.2f}")


if __name__ == "__main__":
    main()
