"""Throughput of the teacher cache writer against the teacher it runs: is the writer ever the bottleneck?

    python benchmarks/bench_cache.py [--tokens 8192] [--vocab 32000] [--k 64] [--seq-len 512] [--batch 4]
                                     [--hidden 512] [--layers 2] [--dtype float16] [--rounds 3] [--json FILE]

The teacher is a small causal-free LM (embedding, ``--layers`` residual MLP blocks of width ``--hidden``, output
projection to ``--vocab`` classes), so that its forward is as cheap as an LM's output projection allows: a real
teacher only makes the writer's share smaller. Per round, taking turns:

* ``teacher``: the teacher alone over the N tokens (the batches the writer makes);
* ``writer + teacher``: :class:`tgtfast.cache.TeacherCacheWriter` end to end (teacher, top-k, shard files with
  sha256 and fsync, manifest) into a fresh directory;
* ``writer alone``: the same with a free teacher (it returns a logits tensor made beforehand), i.e. the most tokens
  per second the writer can take.

Reports the medians, the writer's overhead (``writer + teacher`` minus ``teacher``), and the writer's own split
(teacher calls, top-k on the calling thread, waiting for the background shard writes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
from torch import nn

from tgtfast.cache import TeacherCacheWriter


class TinyLM(nn.Module):
    def __init__(self, vocab: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 2 * hidden), nn.GELU(),
                                                  nn.Linear(2 * hidden, hidden)) for _ in range(layers))
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor = None) -> torch.Tensor:
        h = self.embed(input_ids)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4, help="examples per teacher call")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    ap.add_argument("--shard-size", type=int, default=4, help="examples per shard")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n_ex = max(1, args.tokens // args.seq_len)
    tokens = n_ex * args.seq_len
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, args.vocab, (args.seq_len,), generator=g) for _ in range(n_ex)]
    torch.manual_seed(0)
    teacher = TinyLM(args.vocab, args.hidden, args.layers).to(device).eval()
    made = torch.randn(args.batch, args.seq_len, args.vocab, generator=g).to(device)

    def free(input_ids, attention_mask=None):
        return made[: input_ids.shape[0], : input_ids.shape[1]]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def teacher_alone() -> float:
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            for s in range(0, n_ex, args.batch):
                ids = torch.stack(data[s:s + args.batch]).to(device)
                teacher(ids, torch.ones_like(ids))
        sync()
        return time.perf_counter() - t0

    def write(fn, base) -> dict:
        out = tempfile.mkdtemp(dir=base)
        w = TeacherCacheWriter(out, k=args.k, logprob_dtype=args.dtype, batch_size=args.batch,
                               shard_size=args.shard_size, vocab_size=args.vocab, device=device)
        t0 = time.perf_counter()
        w.write(fn, data)
        wall = time.perf_counter() - t0
        size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
        return dict(w.stats, total_s=wall, bytes=size)

    print(f"{cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}; "
          f"N={tokens} tokens ({n_ex} x {args.seq_len}), V={args.vocab}, k={args.k}, {args.dtype}, teacher "
          f"hidden={args.hidden} layers={args.layers}, batch={args.batch} examples, load average "
          f"{os.getloadavg()[0]:.2f}")
    rows = {"teacher": [], "writer + teacher": [], "writer alone": []}
    detail = {"writer + teacher": [], "writer alone": []}
    with tempfile.TemporaryDirectory() as base:
        write(free, base)  # warm-up
        teacher_alone()
        for _ in range(args.rounds):
            rows["teacher"].append(teacher_alone())
            for name, fn in (("writer + teacher", teacher), ("writer alone", free)):
                st = write(fn, base)
                rows[name].append(st["total_s"])
                detail[name].append(st)
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"{'':<18}{'s':>9}{'tokens/s':>12}{'  (min-max s)':>18}")
    for name, v in rows.items():
        print(f"{name:<18}{med[name]:>9.3f}{tokens / med[name]:>12.0f}   ({min(v):.3f}-{max(v):.3f})")
    overhead = med["writer + teacher"] - med["teacher"]
    split = {key: statistics.median(d[key] for d in detail["writer + teacher"])
             for key in ("teacher_s", "topk_s", "commit_s", "wait_s")}
    print(f"writer overhead over the teacher: {overhead:.3f} s ({100 * overhead / med['teacher']:.1f}% of the "
          f"teacher's time); the writer alone takes {tokens / med['writer alone']:.0f} tokens/s, "
          f"{med['teacher'] / med['writer alone']:.1f}x the teacher's {tokens / med['teacher']:.0f}")
    print(f"inside writer + teacher: teacher calls {split['teacher_s']:.3f} s, top-k {split['topk_s']:.3f} s, "
          f"shard writes {split['commit_s']:.3f} s in the background of which {split['wait_s']:.3f} s waited for; "
          f"{detail['writer alone'][0]['bytes'] / 2**20:.1f} MiB written")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "cpu": cpu_model(), "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "tokens": tokens, "seconds": rows, "median_s": med,
                       "split_s": split, "detail": detail}, fh, indent=1)


if __name__ == "__main__":
    sys.exit(main())
