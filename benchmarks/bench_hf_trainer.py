"""A training step of the Hugging Face Trainer distilling a teacher LM into a student: time and peak memory of
:class:`tgtfast.integrations.transformers.DistillationTrainer` (fused linear loss from the last hidden states, the
``[B, T, V]`` logits never materialised) against the same :class:`transformers.Trainer` computing the loss from
both models' full logits with TRL's ``GKDTrainer.generalized_jsd_loss`` (the same divergence and temperature).

Variants, each in its own subprocess, on the same models (random weights, ``torch.manual_seed(0)``), data and
optimiser (AdamW, gradient clipping at 1):

* ``fused``: ``DistillationTrainer(divergence="jsd", beta=..., temperature=...)``;
* ``trl``: a ``Trainer`` whose ``compute_loss`` runs the student (logits ``[B, T, V]`` with gradients) and the
  teacher (logits under ``no_grad``) and calls ``trl.experimental.gkd.GKDTrainer.generalized_jsd_loss`` on the
  shifted logits (positions ``0 .. T - 2``), normalised by the step's loss tokens as Trainer does;
* ``trl_tgtfast``: the same materialised logits with ``tgtfast.integrations.trl.generalized_jsd_loss`` (tgtfast's
  fused divergence on the logits): what remains when only the loss, not the logits, changes;
* ``ce``: a plain ``Trainer`` training the student alone with its own cross-entropy (no teacher; transformers
  materialises the logits): the cost of a step without distillation.

Each variant runs ``--warmup`` training steps, then ``--steps`` measured ones. Per step (a ``TrainerCallback``
from ``on_step_begin`` to ``on_step_end``: forward, backward, clipping, optimiser step): the wall time and the
peak memory above the memory at the step's start (CPU: the peak resident set size ``VmHWM``, reset through
``/proc/self/clear_refs`` at each step's start, minus the RSS then; GPU: ``torch.cuda.max_memory_allocated``
above the allocation then). Also the peak over the whole run above the RSS (allocation) before ``train()``:
it includes the optimiser's state, created in the first step, the same for every variant. Medians over the
measured steps. The loss of each step is recorded (the same initial weights and batches: the first step's loss
agrees across the distillation variants; ``first_step_kd_loss_max_abs_diff`` in the JSON).

    python benchmarks/bench_hf_trainer.py --json benchmarks/results/cpu-2core-hf-trainer.json
    python benchmarks/bench_hf_trainer.py --student-hidden 128 --teacher-hidden 256 --seq 64 --v 8000   # quick
    python benchmarks/bench_hf_trainer.py --device cuda --dtype bfloat16 --batch 8 --seq 1024 --v 128256

On a CPU the RSS counts what glibc keeps of freed memory; allocations of 32 MiB and more (a ``[B, T, V]`` float32
tensor here) are returned to the system when freed, smaller ones may stay resident and be reused.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

import torch

from sparse_topk_accuracy import cpu_model  # lscpu's model name (this folder is on sys.path when run as a script)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from hf_distill import llama  # noqa: E402  (the example's Llama: untied embeddings, heads of 64)
from tgtfast.bench import _peak_rss_bytes as _hwm, _rss_bytes as _rss  # noqa: E402  (the package's measurement)
from tgtfast.bench.report import environment  # noqa: E402

VARIANTS = ("fused", "trl", "trl_tgtfast", "ce")
IGNORE = -100


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


class RandomBlocks(torch.utils.data.Dataset):
    """``n`` blocks of ``seq`` random token ids (labels: the ids; the first ``seq // 8`` labels masked, a prompt)."""

    def __init__(self, n: int, seq: int, vocab: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)
        self.prompt = seq // 8

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        x = self.ids[i]
        labels = x.clone()
        labels[: self.prompt] = IGNORE
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": labels}


def _materialised_trainer(loss_fn, teacher, beta: float, temperature: float):
    """A Trainer subclass computing the distillation loss from both models' full logits with `loss_fn` (TRL's
    ``generalized_jsd_loss`` signature), normalised by the step's loss tokens (``num_items_in_batch``)."""
    from transformers import Trainer

    class MaterialisedDistillTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs["labels"]
            model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
            out = model(**model_inputs, use_cache=False)
            with torch.no_grad():
                t_logits = teacher(**model_inputs, use_cache=False).logits
            s_logits = out.logits[:, :-1]
            loss = loss_fn(s_logits, t_logits[:, :-1], labels[:, 1:], beta=beta, temperature=temperature,
                           num_items_in_batch=num_items_in_batch)
            return (loss, out) if return_outputs else loss

    return MaterialisedDistillTrainer


def run_child(a: argparse.Namespace) -> Dict:
    """In the subprocess: build the models and the Trainer of `a.child`, train, return the per-step numbers."""
    from transformers import PrinterCallback, TrainerCallback, TrainingArguments, default_data_collator
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, a.dtype)
    student = llama(a.v, a.student_hidden, a.student_layers, a.seq, seed=0).to(dtype)
    teacher = llama(a.v, a.teacher_hidden, a.teacher_layers, a.seq, seed=1).to(dtype).eval().requires_grad_(False)
    total = a.warmup + a.steps
    data = RandomBlocks(total * a.batch, a.seq, a.v)
    args = TrainingArguments(
        output_dir=os.path.join(a.tmp, a.child), report_to="none", use_cpu=not cuda, max_steps=total,
        per_device_train_batch_size=a.batch, learning_rate=1e-4, optim="adamw_torch", lr_scheduler_type="constant",
        max_grad_norm=1.0, seed=0, data_seed=0, save_strategy="no", logging_steps=10 ** 6, disable_tqdm=True,
        dataloader_num_workers=0, log_level="warning")
    kw = dict(model=student, args=args, train_dataset=data, data_collator=default_data_collator)
    if a.child == "ce":
        from transformers import Trainer

        cls = Trainer
    elif a.child == "fused":
        from tgtfast.integrations.transformers import DistillationTrainer

        cls = DistillationTrainer
        kw.update(teacher_model=teacher, divergence="jsd", beta=a.beta, temperature=a.temperature,
                  chunk_size=a.chunk_size)
    else:
        if a.child == "trl":
            os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
            from trl.experimental.gkd import GKDTrainer

            loss_fn = GKDTrainer.generalized_jsd_loss
        else:
            from tgtfast.integrations.trl import generalized_jsd_loss as loss_fn
        cls = _materialised_trainer(loss_fn, teacher.to(device), a.beta, a.temperature)

    losses: List[float] = []

    class Recorder(cls):  # the loss of each step, as computed
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            losses.append(float((loss[0] if return_outputs else loss).detach()))
            return loss

    rows: List[Dict[str, float]] = []
    state: Dict[str, float] = {}

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def memory_now() -> int:
        return torch.cuda.memory_allocated() if cuda else _rss()

    class Measure(TrainerCallback):
        def on_step_begin(self, args, st, control, **kw):
            sync()
            state["run_peak"] = max(state["run_peak"], torch.cuda.max_memory_allocated() if cuda else _hwm())
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            else:
                _reset_hwm()
            state["base"] = memory_now()
            state["start"] = time.perf_counter()

        def on_step_end(self, args, st, control, **kw):
            sync()
            seconds = time.perf_counter() - state["start"]
            peak = torch.cuda.max_memory_allocated() if cuda else _hwm()
            state["run_peak"] = max(state["run_peak"], peak)
            rows.append({"seconds": seconds, "peak_extra_bytes": peak - state["base"]})

    trainer = Recorder(**kw, callbacks=[Measure()])
    trainer.remove_callback(PrinterCallback)
    sync()
    start_memory = memory_now()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    state["run_peak"] = torch.cuda.max_memory_allocated() if cuda else _hwm()
    trainer.train()
    measured = rows[a.warmup:]
    times = [r["seconds"] for r in measured]
    peaks = [r["peak_extra_bytes"] for r in measured]
    return {"variant": a.child, "times_s": times, "median_s": statistics.median(times),
            "step_peak_extra_bytes": peaks, "median_step_peak_extra_bytes": statistics.median(peaks),
            "run_peak_above_start_bytes": state["run_peak"] - start_memory, "losses": losses,
            "tokens_per_step": a.batch * a.seq,
            "parameters": {"student": sum(p.numel() for p in student.parameters()),
                           "teacher": sum(p.numel() for p in teacher.parameters())}}


def _run_variant(variant: str, argv: List[str]) -> Dict:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child", variant]
    env = dict(os.environ, TGTFAST_QUIET="1", TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env)
    if proc.returncode != 0:
        return {"variant": variant, "error": (proc.stderr or proc.stdout).strip().splitlines()[-3:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(result: Dict) -> str:
    """The rows as a markdown table, ratios against the ``trl`` row."""
    rows = result["rows"]
    by = {r["variant"]: r for r in rows if "error" not in r}
    ref = by.get("trl")
    lines = ["| variant | median s/step | min s | tokens/s | step peak MiB | run peak MiB | time / trl | "
             "step peak / trl | first-step loss |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {' '.join(r['error'])} |||||||")
            continue
        t_ratio = f"{r['median_s'] / ref['median_s']:.2f}" if ref else "-"
        m_ratio = (f"{r['median_step_peak_extra_bytes'] / max(ref['median_step_peak_extra_bytes'], 1):.3f}"
                   if ref else "-")
        lines.append(f"| {r['variant']} | {r['median_s']:.3f} | {min(r['times_s']):.3f} | "
                     f"{r['tokens_per_step'] / r['median_s']:.0f} | {r['median_step_peak_extra_bytes'] / 2**20:.0f} | "
                     f"{r['run_peak_above_start_bytes'] / 2**20:.0f} | {t_ratio} | {m_ratio} | "
                     f"{r['losses'][0]:.6f} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--v", type=int, default=32000, help="vocabulary size (both models)")
    p.add_argument("--student-hidden", type=int, default=256)
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--teacher-hidden", type=int, default=512)
    p.add_argument("--teacher-layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--beta", type=float, default=0.5, help="JSD's beta (TRL's; 0: forward KL, 1: reverse KL)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--chunk-size", type=int, default=None, help="rows per chunk of the fused loss")
    p.add_argument("--warmup", type=int, default=2, help="steps before the measured ones")
    p.add_argument("--steps", type=int, default=5, help="measured steps")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--tmp", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "tgtfast-bench-hf-trainer"),
                   help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    for name in ("v", "student_hidden", "student_layers", "teacher_hidden", "teacher_layers", "batch", "steps"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.seq < 2 or a.warmup < 0 or not 0.0 <= a.beta <= 1.0 or a.temperature <= 0:
        p.error("need --seq >= 2, --warmup >= 0, 0 <= --beta <= 1 and --temperature > 0")
    if a.child:
        print(json.dumps(run_child(a)))
        return 0

    forwarded = [x for x in (argv if argv is not None else sys.argv[1:])]
    load_before = os.getloadavg()
    rows = []
    for variant in a.variants:
        row = _run_variant(variant, forwarded)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("losses",)}), file=sys.stderr, flush=True)
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    ok = [r for r in rows if "error" not in r]
    first = [r["losses"][0] for r in ok if r["variant"] != "ce"]
    result = {
        "what": "one Trainer training step (forward, backward, clipping, AdamW) of a student LM distilled from a "
                "frozen teacher with JSD",
        "shape": {"batch": a.batch, "seq": a.seq, "V": a.v, "student": f"Llama {a.student_layers}x{a.student_hidden}",
                  "teacher": f"Llama {a.teacher_layers}x{a.teacher_hidden}"},
        "divergence": {"name": "jsd", "beta": a.beta, "temperature": a.temperature},
        "dtype": a.dtype, "device": a.device, "warmup": a.warmup, "steps": a.steps,
        "environment": {**environment(), "cpu": cpu_model(), "cpus": os.cpu_count(),
                        "threads": a.threads or torch.get_num_threads(), "loadavg_before": load_before,
                        "loadavg_after": os.getloadavg(), "transformers": transformers.__version__, "trl": trl_version},
        "first_step_kd_loss_max_abs_diff": (max(first) - min(first)) if first else None,
        "rows": rows,
    }
    text = table(result)
    header = (f"{result['what']}: batch {a.batch} x seq {a.seq}, V = {a.v}, student {result['shape']['student']}, "
              f"teacher {result['shape']['teacher']}, JSD beta {a.beta}, T {a.temperature}, {a.dtype} on {a.device} "
              f"({result['environment']['threads']} threads, {result['environment']['cpu']}), median of {a.steps} "
              f"steps after {a.warmup}")
    print(header + "\n\n" + text)
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0 if len(ok) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
