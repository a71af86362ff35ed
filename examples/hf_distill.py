"""Distilling a small language model with the Hugging Face Trainer, offline, on the CPU.

    python examples/hf_distill.py                  # the full run (about 10 minutes on 2 loaded CPU cores)
    python examples/hf_distill.py --quick          # a smoke run in under a minute (tiny models, few steps)

What it does, with nothing downloaded:

1. corpus: the text of Python's help topics (``pydoc_data.topics.topics``, one document per topic) and the
   docstrings of the standard library's modules (read with ``ast`` from the ``.py`` files, never imported; one
   document per file), about 2 MB of English prose about Python. Documents go to train / validation / test
   (80 / 10 / 10 %) by a hash of their name, so no document is split across sets.
2. tokenizer: a byte-level BPE (``tokenizers``) of ``--vocab`` tokens trained on the training documents only.
   Each split is tokenised, its documents joined with an end-of-text token and cut into blocks of ``--block``
   tokens (the last partial block dropped).
3. teacher: a Llama causal LM (``--teacher-layers`` x ``--teacher-hidden``) trained with cross-entropy by a plain
   :class:`transformers.Trainer` for ``--teacher-steps`` steps, then saved with ``save_pretrained`` (with the
   tokenizer) in ``OUT/teacher-<key>``: a rerun with the same settings loads it instead of training it again.
4. students: a smaller Llama (``--student-layers`` x ``--student-hidden``) trained for ``--student-steps`` steps,
   the same optimiser, learning-rate schedule, batch size and data order, from the same initial weights (per
   seed), two ways:

   * ``ce``: plain :class:`transformers.Trainer`, cross-entropy on the next token (the model's own loss);
   * ``kd``: :class:`tgtfast.integrations.transformers.DistillationTrainer` with the frozen teacher,
     ``kd_weight * forward_KL(teacher || student) + ce_weight * cross-entropy`` from both models' last hidden
     states (the ``[B, T, V]`` logits are never materialised). ``kd_weight``, ``ce_weight`` and the temperature
     are chosen from the small grid ``GRID`` by the validation loss of seed 0 only (the test split is not
     looked at); ``T != 1`` uses the usual ``T**2`` scaling of the divergence.

   A distillation step also runs the teacher's forward pass, so it costs about two plain steps here; a third
   student, ``ce_long``, trains without KD for ``--ce-long-factor`` (2) times the steps: a baseline of about the
   same wall time (and twice the data).

5. evaluation: every model's cross-entropy per token (natural log) and perplexity on the test blocks (and on the
   validation blocks), computed the same way for all of them from their full logits.

It writes ``OUT/results.json`` (``--out``, default ``hf-distill-results``) and prints a table: the teacher, then
the students without and with distillation (mean and sample standard deviation over ``--seeds``), with the wall
time of each run. One thread by default (``--threads``): on a shared machine a single thread keeps its pace when
the other cores are busy.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import sysconfig
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

EOS = "<|endoftext|>"
# (kd_weight, ce_weight, temperature) tried on the validation split
GRID: Tuple[Tuple[float, float, float], ...] = ((1.0, 0.0, 1.0), (0.5, 0.5, 1.0), (0.5, 0.5, 2.0))
QUICK_GRID = GRID[:2]
SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "idlelib", "lib2to3", "__pycache__", "turtledemo"}


def log(msg: str) -> None:
    """Progress on stderr, with the time of day."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Data


def corpus(max_docstring_files: Optional[int] = None) -> List[Tuple[str, str]]:
    """``(name, text)`` documents: Python's help topics and, per standard-library ``.py`` file, its docstrings
    (module, classes, functions; read with ``ast``, nothing imported). ``max_docstring_files`` caps the files
    read (None: all of them; 0: the help topics only)."""
    from pydoc_data.topics import topics

    docs = [(f"topic:{name}", text.strip()) for name, text in sorted(topics.items()) if text.strip()]
    if max_docstring_files == 0:
        return docs
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for root, dirs, names in os.walk(lib):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        files.extend(Path(root) / n for n in sorted(names) if n.endswith(".py"))
    for path in files[:max_docstring_files]:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        parts = [ast.get_docstring(node) for node in ast.walk(tree)
                 if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        text = "\n\n".join(p for p in parts if p)
        if text:
            docs.append((f"doc:{path.relative_to(lib)}", text))
    return docs


def split_of(name: str) -> str:
    """``train`` / ``validation`` / ``test`` (80 / 10 / 10 %) from a hash of the document's name."""
    bucket = int(hashlib.sha256(name.encode()).hexdigest(), 16) % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def train_tokenizer(texts: Sequence[str], vocab: int):
    """A byte-level BPE tokenizer of `vocab` tokens (``EOS`` included) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def blocks(tok, texts: Sequence[str], block: int) -> torch.Tensor:
    """``[n, block]`` token ids: the texts joined by ``EOS`` and cut into blocks (the last partial block dropped)."""
    eos = tok.token_to_id(EOS)
    ids: List[int] = []
    for enc in tok.encode_batch(list(texts)):
        ids.extend(enc.ids)
        ids.append(eos)
    n = len(ids) // block
    return torch.tensor(ids[: n * block], dtype=torch.int64).view(n, block)


class Blocks(torch.utils.data.Dataset):
    """Causal-LM examples from ``[n, L]`` token blocks: ``input_ids``, ``attention_mask`` and ``labels`` (the
    input ids; the models shift them)."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        x = self.ids[i]
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}


def spread(ids: torch.Tensor, n: int) -> torch.Tensor:
    """At most `n` rows of `ids`, evenly spaced (all of them when there are fewer)."""
    if ids.shape[0] <= n:
        return ids
    return ids[torch.linspace(0, ids.shape[0] - 1, n).round().long()]


# ----------------------------------------------------------------------------------------------------------------
# Models, training, evaluation


def llama(vocab: int, hidden: int, layers: int, block: int, seed: int):
    """A randomly initialised Llama causal LM (weights drawn after ``torch.manual_seed(seed)``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    heads = max(1, hidden // 64)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=block,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def training_args(out: Path, steps: int, seed: int, a: argparse.Namespace, lr: float):
    """Trainer arguments shared by every run: AdamW, linear warm-up over 10% of the steps then cosine decay,
    gradient clipping at 1, batch ``--batch``; the seed fixes the data order too."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out), report_to="none", use_cpu=True, max_steps=steps, per_device_train_batch_size=a.batch,
        learning_rate=lr, optim="adamw_torch", lr_scheduler_type="cosine", warmup_steps=max(1, steps // 10),
        weight_decay=0.01, max_grad_norm=1.0, seed=seed, data_seed=seed, save_strategy="no", eval_strategy="no",
        logging_steps=max(1, steps // 5), disable_tqdm=True, dataloader_num_workers=0, log_level="warning")


def train(model, train_set, out: Path, steps: int, seed: int, a: argparse.Namespace, lr: float,
          teacher=None, kd: Optional[Tuple[float, float, float]] = None) -> Tuple[float, List[Dict]]:
    """Train `model` in place (plain Trainer, or DistillationTrainer with ``kd = (kd_weight, ce_weight, T)``);
    returns the wall seconds and Trainer's log history."""
    from transformers import PrinterCallback, Trainer, default_data_collator

    args = training_args(out, steps, seed, a, lr)
    kw = dict(model=model, args=args, train_dataset=train_set, data_collator=default_data_collator)
    if kd is None:
        trainer = Trainer(**kw)
    else:
        from tgtfast.integrations.transformers import DistillationTrainer

        kd_weight, ce_weight, temperature = kd
        trainer = DistillationTrainer(**kw, teacher_model=teacher, divergence="forward_kl", kd_weight=kd_weight,
                                      ce_weight=ce_weight, temperature=temperature, t2_scaling=temperature != 1.0)
    trainer.remove_callback(PrinterCallback)  # the progress lines of log(); the history is returned
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    model.eval()
    return seconds, [dict(h) for h in trainer.state.log_history]


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, batch: int) -> Dict[str, float]:
    """Mean next-token cross-entropy (nats per token) over the blocks `ids` and its perplexity."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, ids.shape[0], batch):
        x = ids[start:start + batch]
        logits = model(input_ids=x).logits[:, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                         x[:, 1:].reshape(-1), reduction="sum"))
        count += x[:, 1:].numel()
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count}


def params_of(model) -> int:
    return sum(p.numel() for p in model.parameters())


def teacher_key(a: argparse.Namespace, n_docs: int) -> str:
    """What the cached teacher depends on (settings, corpus size, Python and transformers versions)."""
    import transformers

    settings = dict(vocab=a.vocab, block=a.block, batch=a.batch, hidden=a.teacher_hidden, layers=a.teacher_layers,
                    steps=a.teacher_steps, lr=a.teacher_lr, docs=n_docs, quick=a.quick,
                    python=platform.python_version(), transformers=transformers.__version__)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def get_teacher(a: argparse.Namespace, out: Path, train_texts: Sequence[str], n_docs: int):
    """The tokenizer and the trained teacher: loaded from ``OUT/teacher-<key>`` when present, else trained (the
    tokenizer on the training texts, the teacher on their blocks) and saved there."""
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    folder = out / f"teacher-{teacher_key(a, n_docs)}"
    info_path = folder / "teacher.json"
    if info_path.exists():
        log(f"teacher: loading {folder}")
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        return tok, LlamaForCausalLM.from_pretrained(str(folder)).eval(), json.loads(info_path.read_text()), True
    start = time.perf_counter()
    tok = train_tokenizer(train_texts, a.vocab)
    tok_seconds = time.perf_counter() - start
    log(f"tokenizer: {tok.get_vocab_size()} tokens in {tok_seconds:.1f} s")
    train_set = Blocks(blocks(tok, train_texts, a.block))
    teacher = llama(tok.get_vocab_size(), a.teacher_hidden, a.teacher_layers, a.block, seed=0)
    log(f"teacher: {params_of(teacher) / 1e6:.2f} M parameters, {a.teacher_steps} steps on {len(train_set)} blocks")
    seconds, history = train(teacher, train_set, folder / "run", a.teacher_steps, 0, a, a.teacher_lr)
    log(f"teacher: trained in {seconds:.0f} s")
    info = {"train_seconds": seconds, "tokenizer_seconds": tok_seconds, "log_history": history}
    folder.mkdir(parents=True, exist_ok=True)
    teacher.save_pretrained(str(folder))
    tok.save(str(folder / "tokenizer.json"))
    info_path.write_text(json.dumps(info, indent=1))
    return tok, teacher, info, False


def mean_std(xs: Sequence[float]) -> Dict[str, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


# ----------------------------------------------------------------------------------------------------------------
# The run


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line; ``--quick`` replaces the sizes by tiny ones (those given explicitly are kept)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="hf-distill-results", help="output folder (results.json, the cached teacher)")
    p.add_argument("--json", help="results file (default OUT/results.json)")
    p.add_argument("--quick", action="store_true", help="tiny models and few steps: a smoke run under a minute")
    p.add_argument("--seeds", type=int, nargs="+", help="student seeds (default 0 1 2; quick: 0)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--ce-long-factor", type=int, default=2,
                   help="also train the students without KD for this many times the steps (a KD step costs about "
                        "two plain ones: a baseline of about the same time); 0: not")
    sizes = {  # name: (full, quick, type, help)
        "vocab": (3000, 512, int, "tokenizer vocabulary"),
        "block": (128, 64, int, "tokens per block"),
        "batch": (8, 4, int, "blocks per training step"),
        "teacher_hidden": (256, 64, int, "teacher width"),
        "teacher_layers": (4, 2, int, "teacher layers"),
        "teacher_steps": (900, 40, int, "teacher training steps"),
        "teacher_lr": (1e-3, 3e-3, float, "teacher learning rate"),
        "student_hidden": (128, 32, int, "student width"),
        "student_layers": (2, 1, int, "student layers"),
        "student_steps": (200, 16, int, "student training steps (both ways)"),
        "student_lr": (3e-3, 3e-3, float, "student learning rate (both ways)"),
        "eval_blocks": (256, 16, int, "test blocks evaluated (evenly spaced; validation: half as many)"),
        "docstring_files": (-1, 0, int, "standard-library files read for docstrings (-1: all, 0: none)"),
    }
    for name, (_, _, typ, text) in sizes.items():
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=text)
    a = p.parse_args(argv)
    for name, (full, quick, _, _) in sizes.items():
        if getattr(a, name) is None:
            setattr(a, name, quick if a.quick else full)
    if a.seeds is None:
        a.seeds = [0] if a.quick else [0, 1, 2]
    for name in ("vocab", "block", "batch", "teacher_hidden", "teacher_layers", "teacher_steps", "student_hidden",
                 "student_layers", "student_steps", "eval_blocks", "threads"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.block < 2:
        p.error("--block must be at least 2")
    if a.ce_long_factor < 0:
        p.error("--ce-long-factor must be 0 or more")
    return a


def environment() -> Dict[str, object]:
    """CPU model, load, threads and library versions."""
    import tokenizers
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "loadavg": load,
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    """Run everything; returns (and writes) the results."""
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    wall = time.perf_counter()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()

    docs = corpus(None if a.docstring_files < 0 else a.docstring_files)
    texts: Dict[str, List[str]] = {"train": [], "validation": [], "test": []}
    for name, text in docs:
        texts[split_of(name)].append(text)
    log(f"corpus: {len(docs)} documents, {sum(len(t) for _, t in docs) / 1e6:.2f} M characters; "
        + ", ".join(f"{k} {len(v)}" for k, v in texts.items()))

    tok, teacher, teacher_info, cached = get_teacher(a, out, texts["train"], len(docs))
    data = {k: blocks(tok, v, a.block) for k, v in texts.items()}
    train_set = Blocks(data["train"])
    val_ids = spread(data["validation"], max(1, a.eval_blocks // 2))
    test_ids = spread(data["test"], a.eval_blocks)
    log("blocks: " + ", ".join(f"{k} {v.shape[0]}" for k, v in data.items())
        + f" (evaluated: validation {val_ids.shape[0]}, test {test_ids.shape[0]})")

    def scores(model) -> Dict[str, Dict[str, float]]:
        return {"validation": evaluate(model, val_ids, a.batch), "test": evaluate(model, test_ids, a.batch)}

    vocab = tok.get_vocab_size()
    teacher_scores = scores(teacher)
    log(f"teacher: test loss {teacher_scores['test']['loss']:.3f}")
    results: Dict = {
        "settings": {k: v for k, v in vars(a).items()}, "environment": env,
        "corpus": {"documents": {k: len(v) for k, v in texts.items()},
                   "characters": sum(len(t) for _, t in docs), "tokens": {k: int(v.numel()) for k, v in data.items()},
                   "blocks": {k: int(v.shape[0]) for k, v in data.items()},
                   "evaluated_blocks": {"validation": int(val_ids.shape[0]), "test": int(test_ids.shape[0])}},
        "tokenizer": {"kind": "byte-level BPE (tokenizers)", "vocab": vocab},
        "teacher": {"parameters": params_of(teacher), "layers": a.teacher_layers, "hidden": a.teacher_hidden,
                    "steps": a.teacher_steps, "cached": cached, "train_seconds": teacher_info["train_seconds"],
                    **teacher_scores},
        "divergence": "forward_kl",
    }

    def student(seed: int, kd: Optional[Tuple[float, float, float]], steps: int = a.student_steps) -> Dict:
        model = llama(vocab, a.student_hidden, a.student_layers, a.block, seed)
        name = ("ce" if steps == a.student_steps else f"ce-{steps}-steps") if kd is None else "kd-{}-{}-{}".format(*kd)
        seconds, history = train(model, train_set, out / "runs" / f"{name}-seed{seed}", steps, seed, a,
                                 a.student_lr, teacher=teacher, kd=kd)
        row = {"seed": seed, "steps": steps, "train_seconds": seconds, **scores(model),
               "train_log": [h for h in history if "loss" in h]}
        if kd is not None:
            row.update(kd_weight=kd[0], ce_weight=kd[1], temperature=kd[2])
        log(f"student {name} seed {seed}: {seconds:.0f} s, validation loss {row['validation']['loss']:.3f}, "
            f"test loss {row['test']['loss']:.3f}")
        return row

    grid = QUICK_GRID if a.quick else GRID
    first = a.seeds[0]
    results["grid"] = [student(first, kd) for kd in grid]
    best = min(results["grid"], key=lambda r: r["validation"]["loss"])
    chosen = (best["kd_weight"], best["ce_weight"], best["temperature"])
    results["chosen"] = {"kd_weight": chosen[0], "ce_weight": chosen[1], "temperature": chosen[2],
                         "by": f"lowest validation loss of seed {first}"}
    log(f"chosen on validation: kd_weight {chosen[0]}, ce_weight {chosen[1]}, temperature {chosen[2]}")
    runs: Dict[str, List[Dict]] = {"ce": [], "kd": [best]}
    if a.ce_long_factor:
        runs["ce_long"] = []
    for seed in a.seeds:
        runs["ce"].append(student(seed, None))
        if seed != first:
            runs["kd"].append(student(seed, chosen))
        if a.ce_long_factor:
            runs["ce_long"].append(student(seed, None, a.ce_long_factor * a.student_steps))
    results["students"] = {"parameters": params_of(llama(vocab, a.student_hidden, a.student_layers, a.block, 0)),
                           "layers": a.student_layers, "hidden": a.student_hidden, "steps": a.student_steps,
                           "runs": runs}
    summary = {"teacher": {"test_loss": mean_std([teacher_scores["test"]["loss"]]),
                           "test_perplexity": mean_std([teacher_scores["test"]["perplexity"]]),
                           "train_seconds": mean_std([teacher_info["train_seconds"]])}}
    for way, rows in runs.items():
        summary[f"student_{way}"] = {"test_loss": mean_std([r["test"]["loss"] for r in rows]),
                                     "test_perplexity": mean_std([r["test"]["perplexity"] for r in rows]),
                                     "train_seconds": mean_std([r["train_seconds"] for r in rows])}
    results["summary"] = summary
    results["wall_seconds"] = time.perf_counter() - wall
    path = Path(a.json) if a.json else out / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print(table(results))
    log(f"wrote {path} ({results['wall_seconds']:.0f} s in all)")
    return results


def table(results: Dict) -> str:
    """The summary as a markdown table."""
    s = results["summary"]
    c = results["chosen"]
    names = {"teacher": f"teacher ({results['teacher']['parameters'] / 1e6:.2f} M parameters, "
                        f"{results['teacher']['steps']} steps)",
             "student_ce": f"student without KD ({results['students']['parameters'] / 1e6:.2f} M, cross-entropy)",
             "student_kd": f"student with KD (forward KL, kd {c['kd_weight']}, ce {c['ce_weight']}, "
                           f"T {c['temperature']})"}
    if "student_ce_long" in s:
        factor = results["settings"]["ce_long_factor"]
        names["student_ce_long"] = f"student without KD, {factor}x the steps"
    lines = ["| model | seeds | test loss (nats/token) | test perplexity | train time (s) |",
             "|---|---|---|---|---|"]
    for key, label in names.items():
        r = s[key]
        lines.append(f"| {label} | {r['test_loss']['n']} | {r['test_loss']['mean']:.3f} ± {r['test_loss']['std']:.3f}"
                     f" | {r['test_perplexity']['mean']:.1f} ± {r['test_perplexity']['std']:.1f}"
                     f" | {r['train_seconds']['mean']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
