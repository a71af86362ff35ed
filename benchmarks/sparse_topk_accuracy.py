"""How much a cached top-k teacher loses against the dense teacher, measured on a small real language model.

    python benchmarks/sparse_topk_accuracy.py --cache-dir /tmp/tgtfast-topk \
        --json benchmarks/results/cpu-sparse-topk-accuracy.json --plot benchmarks/results/cpu-sparse-topk-accuracy.png

What it builds (once; everything is cached under ``--cache-dir`` and reused when the settings match):

* corpus: the ``.py`` files of the running Python's standard library (``sysconfig.get_paths()["stdlib"]``),
  without ``site-packages``, ``__pycache__`` and the test folders (``test``, ``tests``, ``idle_test``). Files are
  split by a hash of their path: one in ``--heldout-every`` is held out, the rest is training text.
* tokenizer: byte-level BPE (``tokenizers``) with ``--vocab`` classes, trained on the training files.
* teacher: a GPT-2 style causal LM (``transformers.GPT2LMHeadModel``, ``--teacher-layers`` x ``--teacher-width``)
  trained with cross-entropy for ``--teacher-steps`` steps on random windows of the training text.
* student: a smaller GPT-2 (``--student-layers`` x ``--student-width``) trained the same way for fewer steps
  (``--student-steps``): a student in the middle of its training, whose distribution is still far from the
  teacher's.

What it measures, on ``--eval-tokens`` tokens of held-out text (both models' logits in float64, so that the numbers
are the top-k approximation and not rounding): for each ``k`` and tail (``bucket``, ``renormalize``), divergence
(forward KL, reverse KL with the bucket only, JSD with beta = 0.5, TVD) and temperature,

* ``loss_rel_err``: ``(L_k - L) / L`` where ``L = tgtfast.distill_loss(student_logits, teacher_logits, ...)`` (the
  dense teacher) and ``L_k`` the same call with ``tgtfast.SparseTeacher`` of the teacher's top-k log-probabilities;
* ``grad_rel_l2``: ``||g_k - g|| / ||g||`` for the gradients wrt the student logits (all tokens, one vector);
* ``grad_cos``: their cosine similarity (``grad_cos_row_mean``: the mean over tokens of each token's cosine);
* the teacher's kept mass ``sum_{top k} p`` at each k and temperature: mean and 10th percentile over tokens;
* the same errors restricted to the tokens whose teacher keeps a given mass at temperature 1 (bins of MASS_BINS,
  every k pooled): how the error depends on the kept mass, which transfers to teachers more peaked than this one.

Variants besides the two tails: for T != 1 the top-k taken at T (``log_softmax(t / T)``, a cache written at
temperature T) with the bucket, the loss at temperature 1 and the student's logits scaled
by 1 / T; for forward KL at T = 1 the log-probabilities rounded to float16 (the cache's default dtype).

It writes a JSON (``--json``), a plot (``--plot``: the loss relative error and ``1 - cosine`` of the gradient
against k, one line per divergence and tail, a panel per temperature) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch

import tgtfast

# (divergence, its parameters, the tails it is measured with). Reverse KL is +inf against a renormalised teacher
# wherever the student has mass outside the kept classes, and tgtfast refuses that combination.
DIVERGENCES = [
    ("forward_kl", {}, ("bucket", "renormalize")),
    ("reverse_kl", {}, ("bucket",)),
    ("jsd", {"beta": 0.5}, ("bucket", "renormalize")),
    ("tvd", {}, ("bucket", "renormalize")),
]
# Bins of the teacher's kept mass (temperature 1) for the per-token breakdown; the last one includes 1.
MASS_BINS = [0.0, 0.5, 0.8, 0.9, 0.95, 0.99, 1.0]
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
EOS = "<|endoftext|>"


def log(msg: str) -> None:
    print(msg, flush=True)


def key_of(settings: dict) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


# ----------------------------------------------------------------------------------------------------------------
# Corpus and tokenizer


def corpus_files(heldout_every: int):
    """(train, heldout) lists of (relative path, text) from the standard library's .py files, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, heldout = [], []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS)
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = Path(d) / name
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            rel = str(path.relative_to(root))
            h = int(hashlib.sha1(rel.encode()).hexdigest(), 16)
            (heldout if h % heldout_every == 0 else train).append((rel, text))
    return train, heldout


def build_tokenizer(train, vocab: int, path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if path.exists():
        return Tokenizer.from_file(str(path)), True
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((text for _, text in train), trainer=trainer)
    tok.save(str(path))
    return tok, False


def encode(tok, files) -> torch.Tensor:
    eos = tok.token_to_id(EOS)
    ids = []
    for enc in tok.encode_batch([text for _, text in files]):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int32)


# ----------------------------------------------------------------------------------------------------------------
# Models


def make_model(vocab: int, layers: int, width: int, heads: int, ctx: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab, n_positions=ctx, n_embd=width, n_layer=layers, n_head=heads,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def train_model(name, settings, train_ids, heldout_ids, folder: Path):
    """Train (or load) a GPT-2 of `settings` with cross-entropy on random windows of `train_ids`."""
    from transformers import GPT2LMHeadModel

    log_path = folder / "train_log.json"
    if log_path.exists():
        log(f"{name}: cached in {folder}")
        return GPT2LMHeadModel.from_pretrained(str(folder)).eval(), json.loads(log_path.read_text()), True
    torch.manual_seed(settings["seed"])
    model = make_model(settings["vocab"], settings["layers"], settings["width"], settings["heads"], settings["ctx"])
    n_params = sum(p.numel() for p in model.parameters())
    steps, batch, ctx, lr = settings["steps"], settings["batch"], settings["ctx"], settings["lr"]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, steps // 20)

    def lr_at(step):  # linear warm-up, cosine decay to a tenth
        if step < warmup:
            return lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    gen = torch.Generator().manual_seed(settings["seed"])
    history = []
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        starts = torch.randint(0, len(train_ids) - ctx - 1, (batch,), generator=gen)
        x = torch.stack([train_ids[s:s + ctx] for s in starts.tolist()]).long()
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        history.append(loss.item())
        if step % 25 == 0 or step == steps - 1:
            log(f"{name}: step {step:4d}/{steps}  loss {loss.item():.3f}  {time.perf_counter() - t0:6.1f} s")
    seconds = time.perf_counter() - t0
    model.eval()
    info = {"settings": settings, "parameters": n_params, "train_seconds": seconds,
            "train_loss_first": history[0], "train_loss_last_25_mean": sum(history[-25:]) / len(history[-25:]),
            "train_loss_history_every_10": history[::10]}
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    log_path.write_text(json.dumps(info, indent=1))
    return model, info, False


@torch.no_grad()
def eval_logits(model, heldout_ids: torch.Tensor, n_tokens: int, ctx: int):
    """Logits [N, V] (float64) and next-token labels [N] of n_tokens held-out positions: n_tokens / ctx windows of
    ctx tokens (each predicting its ctx next tokens) at evenly spaced offsets of the held-out text, so that they
    come from many files."""
    rows = n_tokens // ctx
    if len(heldout_ids) < rows * (ctx + 1):
        raise SystemExit(f"held-out text has {len(heldout_ids)} tokens, {rows * (ctx + 1)} needed")
    starts = torch.linspace(0, len(heldout_ids) - ctx - 1, rows).long().tolist()
    win = torch.stack([heldout_ids[s:s + ctx + 1] for s in starts]).long()
    logits = torch.cat([model(input_ids=win[i:i + 8, :-1]).logits for i in range(0, rows, 8)])
    return logits.reshape(-1, logits.shape[-1]).double(), win[:, 1:].reshape(-1)


# ----------------------------------------------------------------------------------------------------------------
# The measurement


def loss_and_grad(student, teacher, divergence, params, temperature, labels, **kw):
    """The batch-mean loss, its per-token losses and its gradient wrt the student logits (no token is ignored, so
    the mean of the per-token losses is the batch mean)."""
    s = student.detach().clone().requires_grad_(True)
    rows = tgtfast.distill_loss(s, teacher, divergence, temperature=temperature, target=labels, reduction="none",
                                **params, **kw)
    loss = rows.sum() / rows.numel()
    loss.backward()
    return loss.item(), rows.detach(), s.grad


def by_kept_mass(mass, rows, dense_rows, grad, dense_grad):
    """The errors restricted to the tokens whose teacher keeps a mass in each bin of MASS_BINS."""
    out = []
    for lo, hi in zip(MASS_BINS[:-1], MASS_BINS[1:]):
        sel = (mass >= lo) & (mass < hi) if hi < 1 else (mass >= lo)
        n = int(sel.sum())
        entry = {"mass_lo": lo, "mass_hi": hi, "tokens": n}
        if n:
            d, g, gd = dense_rows[sel].sum().item(), grad[sel], dense_grad[sel]
            entry.update({
                "dense_loss_sum": d, "topk_loss_sum": rows[sel].sum().item(), "grad_dot": (g * gd).sum().item(),
                "grad_sq": (g * g).sum().item(), "dense_grad_sq": (gd * gd).sum().item(),
                "diff_sq": ((g - gd) ** 2).sum().item(),
                "loss_rel_err": (rows[sel].sum().item() - d) / d if d > 0 else None,
                "grad_rel_l2": ((g - gd).norm() / gd.norm()).item(),
                "grad_cos": ((g * gd).sum() / (g.norm() * gd.norm())).item(),
            })
        out.append(entry)
    return out


def variant_name(tail: str, cache_temperature: float, cache_dtype: str) -> str:
    name = tail
    if cache_temperature != 1:
        name += f", cached at T={cache_temperature:g}"
    if cache_dtype != "float64":
        name += f", {cache_dtype} cache"
    return name


def measure(student, teacher, labels, ks, temperatures):
    """Every (temperature, divergence, teacher variant, k) against the dense teacher. The variants: the top-k
    log-probabilities at temperature 1 with each tail the divergence allows (the loss applies T); for T != 1 also the
    top-k taken at T (``log_softmax(t / T)``, a cache written at temperature T) with the bucket, the loss then at
    temperature 1 and the student's logits scaled by 1 / T; for forward KL at T = 1 also the log-probabilities
    rounded to float16 (the cache's default dtype)."""
    logp = teacher.log_softmax(-1)
    top_lp, top_idx = logp.topk(max(ks), dim=-1)  # sorted, so the first k columns are the top k
    kept = {T: {} for T in sorted({1.0, *temperatures})}  # the teacher's kept mass at each temperature and k
    masses = {k: top_lp[:, :k].exp().sum(-1) for k in ks}  # at temperature 1: the bins of by_kept_mass
    for T in kept:
        p_top = (teacher / T).log_softmax(-1).gather(-1, top_idx).exp()
        for k in ks:
            mass = p_top[:, :k].sum(-1)
            kept[T][k] = {"mean": mass.mean().item(), "p10": mass.quantile(0.1).item(),
                          "median": mass.median().item()}
    q_top = student.softmax(-1).gather(-1, top_idx)
    student_mass = {k: {"mean": q_top[:, :k].sum(-1).mean().item()} for k in ks}  # at temperature 1
    results = []
    for T in temperatures:
        top_lp_T = (teacher / T).log_softmax(-1).gather(-1, top_idx)
        for divergence, params, tails in DIVERGENCES:
            dense_loss, dense_rows, dense_grad = loss_and_grad(student, teacher, divergence, params, T, labels)
            dense_norm = dense_grad.norm().item()
            variants = [(tail, 1.0, "float64") for tail in tails]
            if T != 1 and "bucket" in tails:
                variants.append(("bucket", T, "float64"))
            if T == 1 and divergence == "forward_kl":
                variants.append(("bucket", 1.0, "float16"))
            for tail, cache_T, cache_dtype in variants:
                lp_all = top_lp if cache_T == 1 else top_lp_T
                for k in ks:
                    lp = lp_all[:, :k]
                    if cache_dtype == "float16":
                        lp = lp.half()
                    sparse = tgtfast.SparseTeacher(top_idx[:, :k].contiguous(), lp.contiguous(), tail=tail)
                    if cache_T == 1:
                        loss, rows, grad = loss_and_grad(student, sparse, divergence, params, T, labels)
                    else:  # the cached log-probabilities already hold T: temper only the student
                        loss, rows, grad = loss_and_grad(student, sparse, divergence, params, 1.0, labels,
                                                         logit_scale=1.0 / T)
                    row_cos = torch.nn.functional.cosine_similarity(grad, dense_grad, dim=-1)
                    results.append({
                        "divergence": divergence, "params": params, "tail": tail, "cache_temperature": cache_T,
                        "cache_dtype": cache_dtype, "variant": variant_name(tail, cache_T, cache_dtype),
                        "temperature": T, "k": k, "dense_loss": dense_loss, "topk_loss": loss,
                        "loss_rel_err": (loss - dense_loss) / dense_loss,
                        "grad_rel_l2": (grad - dense_grad).norm().item() / dense_norm,
                        "grad_cos": (grad * dense_grad).sum().item() / (grad.norm().item() * dense_norm),
                        "grad_cos_row_mean": row_cos.mean().item(),
                        "by_kept_mass": by_kept_mass(masses[k], rows, dense_rows, grad, dense_grad),
                    })
            log(f"  T={T:g} {divergence}: dense loss {dense_loss:.4f}")
    return kept, student_mass, results


# ----------------------------------------------------------------------------------------------------------------
# Output


def pct(x: float) -> str:
    """A percentage with two significant digits (signed when negative)."""
    v = 100 * x
    if v == 0:
        return "0%"
    digits = max(0, 1 - int(math.floor(math.log10(abs(v)))))
    return f"{v:.{min(digits, 6)}f}%"


def cos_str(c: float) -> str:
    if c >= 0.99:  # enough nines to show the distance from 1
        digits = max(3, 2 - int(math.floor(math.log10(max(1 - c, 1e-12)))))
        return f"{c:.{min(digits, 8)}f}"
    return f"{c:.3f}"


def markdown_table(kept, student_mass, results, ks) -> str:
    head = "| divergence | tail | T | " + " | ".join(f"k={k}" for k in ks) + " |"
    lines = [head, "|" + "---|" * (3 + len(ks))]
    for T, by_k in kept.items():
        lines.append(f"| teacher's kept mass at T={T:g} (mean; 10th percentile) | | | "
                     + " | ".join(f"{by_k[k]['mean']:.3f}; {by_k[k]['p10']:.3f}" for k in ks) + " |")
    lines.append("| student's mass on the teacher's top k at T=1 (mean) | | | "
                 + " | ".join(f"{student_mass[k]['mean']:.3f}" for k in ks) + " |")
    order = []
    for r in results:
        key = (r["temperature"], r["divergence"], r["variant"])
        if key not in order:
            order.append(key)
    for T, div, tail in order:
        cells = []
        for k in ks:
            r = next(x for x in results
                     if (x["temperature"], x["divergence"], x["variant"], x["k"]) == (T, div, tail, k))
            cells.append(f"{pct(r['loss_rel_err'])} / {pct(r['grad_rel_l2'])} / {cos_str(r['grad_cos'])}")
        name = div + (" (beta 0.5)" if div == "jsd" else "")
        lines.append(f"| {name} | {tail} | {T:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pooled(rs, i):
    """Bin i of by_kept_mass pooled over the records rs (the k of one line): (pairs, loss rel. error, grad cosine)."""
    es = [r["by_kept_mass"][i] for r in rs if r["by_kept_mass"][i]["tokens"]]
    n = sum(e["tokens"] for e in es)
    if not n:
        return 0, None, None
    d, t = sum(e["dense_loss_sum"] for e in es), sum(e["topk_loss_sum"] for e in es)
    dot, gg, dd = (sum(e[f] for e in es) for f in ("grad_dot", "grad_sq", "dense_grad_sq"))
    return n, (t - d) / d if d > 0 else None, dot / math.sqrt(gg * dd) if gg > 0 and dd > 0 else None


def lines_of(results, temperature):
    """{(divergence, variant): its records sorted by k} at one temperature, in the order of the results."""
    out = {}
    for r in results:
        if r["temperature"] == temperature:
            out.setdefault((r["divergence"], r["variant"]), []).append(r)
    return {key: sorted(rs, key=lambda r: r["k"]) for key, rs in out.items()}


def bin_label(i: int) -> str:
    lo, hi = MASS_BINS[i], MASS_BINS[i + 1]
    return f"[{lo:g}, {hi:g}{']' if hi == 1 else ')'}"


def mass_table(results, temperature) -> str:
    """Errors by the teacher's kept mass: every (token, k) pair whose top-k keeps a mass in the bin, pooled over k."""
    nbins = len(MASS_BINS) - 1
    lines = ["| divergence | tail | " + " | ".join(bin_label(i) for i in range(nbins)) + " |",
             "|" + "---|" * (2 + nbins)]
    counts = None
    for (div, variant), rs in lines_of(results, temperature).items():
        cells, ns = [], []
        for i in range(nbins):
            n, err, cos = pooled(rs, i)
            ns.append(n)
            err_s, cos_s = "-" if err is None else pct(err), "-" if cos is None else cos_str(cos)
            cells.append(f"{err_s} / {cos_s}" if n else "-")
        counts = counts or ns
        name = div + (" (beta 0.5)" if div == "jsd" else "")
        lines.append(f"| {name} | {variant} | " + " | ".join(cells) + " |")
    lines.insert(2, "| (token, k) pairs | | " + " | ".join(str(n) for n in counts) + " |")
    return "\n".join(lines)


def plot(kept, results, ks, temperatures, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"forward_kl": "C0", "reverse_kl": "C3", "jsd": "C2", "tvd": "C1"}

    def style(r):
        if r["cache_dtype"] != "float64":
            return dict(linestyle="-.", marker="x", markersize=7)
        if r["cache_temperature"] != 1:
            return dict(linestyle=":", marker="s", markersize=3)
        return dict(linestyle="-" if r["tail"] == "bucket" else "--", marker="o", markersize=3)

    nbins = len(MASS_BINS) - 1
    fig, axes = plt.subplots(3, len(temperatures), figsize=(6 * len(temperatures), 13), squeeze=False)
    handles = {}
    for col, T in enumerate(temperatures):
        for (div, variant), rs in lines_of(results, T).items():
            kw = dict(color=colors[div], label=f"{div}, {variant}", **style(rs[0]))
            axes[0][col].plot([r["k"] for r in rs], [max(abs(r["loss_rel_err"]), 1e-9) for r in rs], **kw)
            axes[1][col].plot([r["k"] for r in rs], [max(1 - r["grad_cos"], 1e-12) for r in rs], **kw)
            errs = [pooled(rs, i)[1] for i in range(nbins)]
            xs = [i for i in range(nbins) if errs[i] is not None]
            (h,) = axes[2][col].plot(xs, [max(abs(errs[i]), 1e-9) for i in xs], **kw)
            handles.setdefault(kw["label"], h)
        axes[0][col].set_title(f"temperature {T:g}")
        axes[0][col].set_ylabel("|loss relative error| against the dense teacher")
        axes[1][col].set_ylabel("1 - cosine(top-k gradient, dense gradient)")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.set_xticks(ks)
            ax.set_xticklabels([f"{k}\n({100 * kept[1.0][k]['mean']:.0f}%)" for k in ks])
            ax.set_xlabel("k (teacher's mean kept mass at T=1)")
        ax = axes[2][col]
        ax.set_xticks(range(nbins))
        ax.set_xticklabels([bin_label(i) for i in range(nbins)])
        ax.set_xlabel("teacher's kept mass at T=1 of the (token, k) pairs, every k pooled")
        ax.set_ylabel("|loss relative error| in the bin")
        for ax in axes[:, col]:
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=3, fontsize=8)
    fig.suptitle("Top-k teacher against the dense teacher (gradients wrt the student logits)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=100)


def backends_used(device, dtype) -> dict:
    """The backend tgtfast picks for the dense divergence and for the sparse teacher's coarse-graining."""
    from tgtfast.dispatch import select

    return {op: select(None, device, dtype, op=op).name.lower() for op in ("divergence", "sparse_coarse")}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", type=Path, required=True, help="where the tokenizer, data and models are kept")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 8, 32, 128, 512])
    ap.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0])
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--heldout-every", type=int, default=10)
    ap.add_argument("--ctx", type=int, default=128, help="training and evaluation window, tokens")
    ap.add_argument("--batch", type=int, default=16, help="windows per training step")
    ap.add_argument("--teacher-layers", type=int, default=4)
    ap.add_argument("--teacher-width", type=int, default=128)
    ap.add_argument("--teacher-steps", type=int, default=800)
    ap.add_argument("--student-layers", type=int, default=2)
    ap.add_argument("--student-width", type=int, default=96)
    ap.add_argument("--student-steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    t_start, cpu_start, load_start = time.perf_counter(), time.process_time(), os.getloadavg()
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    timings, cached = {}, {}

    t0 = time.perf_counter()
    train_files, heldout_files = corpus_files(args.heldout_every)
    tok_settings = {"corpus": "stdlib-py", "python": platform.python_version(), "vocab": args.vocab,
                    "heldout_every": args.heldout_every}
    tok_key = key_of(tok_settings)
    tok, cached["tokenizer"] = build_tokenizer(train_files, args.vocab, args.cache_dir / f"tokenizer-{tok_key}.json")
    data_path = args.cache_dir / f"ids-{tok_key}.pt"
    if data_path.exists():
        data = torch.load(data_path)
    else:
        data = {"train": encode(tok, train_files), "heldout": encode(tok, heldout_files)}
        torch.save(data, data_path)
    timings["tokenizer_and_data_s"] = time.perf_counter() - t0
    corpus = {
        "source": f"the .py files of the Python {platform.python_version()} standard library "
                  f"({sysconfig.get_paths()['stdlib']}), without {sorted(SKIP_DIRS)}",
        "train_files": len(train_files), "heldout_files": len(heldout_files),
        "train_bytes": sum(len(t.encode()) for _, t in train_files),
        "heldout_bytes": sum(len(t.encode()) for _, t in heldout_files),
        "train_tokens": len(data["train"]), "heldout_tokens": len(data["heldout"]),
        "tokenizer": f"byte-level BPE (tokenizers), vocabulary {tok.get_vocab_size()}",
    }
    log(f"corpus: {corpus['train_files']} train files ({corpus['train_tokens']} tokens), "
        f"{corpus['heldout_files']} held-out files ({corpus['heldout_tokens']} tokens); "
        f"tokenizer and data {timings['tokenizer_and_data_s']:.1f} s (cached: {cached['tokenizer']})")

    models, infos = {}, {}
    for name, layers, width, steps in (("teacher", args.teacher_layers, args.teacher_width, args.teacher_steps),
                                       ("student", args.student_layers, args.student_width, args.student_steps)):
        settings = {"tokenizer": tok_key, "vocab": tok.get_vocab_size(), "layers": layers, "width": width,
                    "heads": max(1, width // 64), "ctx": args.ctx, "batch": args.batch, "steps": steps,
                    "lr": args.lr, "seed": args.seed}
        t0 = time.perf_counter()
        models[name], infos[name], cached[name] = train_model(
            name, settings, data["train"], data["heldout"], args.cache_dir / f"{name}-{key_of(settings)}")
        timings[f"{name}_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    teacher, labels = eval_logits(models["teacher"], data["heldout"], args.eval_tokens, args.ctx)
    student, _ = eval_logits(models["student"], data["heldout"], args.eval_tokens, args.ctx)
    for name, logits in (("teacher", teacher), ("student", student)):
        logp = logits.log_softmax(-1)
        infos[name]["heldout_ce_nats"] = torch.nn.functional.nll_loss(logp, labels).item()
        infos[name]["heldout_entropy_nats"] = -(logp.exp() * logp).sum(-1).mean().item()
        infos[name]["heldout_top1_prob_mean"] = logp.max(-1).values.exp().mean().item()
        infos[name]["heldout_top1_accuracy"] = (logp.argmax(-1) == labels).double().mean().item()
        log(f"{name}: held-out cross-entropy {infos[name]['heldout_ce_nats']:.3f} nats, entropy "
            f"{infos[name]['heldout_entropy_nats']:.3f} nats, mean top-1 probability "
            f"{infos[name]['heldout_top1_prob_mean']:.3f}, top-1 accuracy {infos[name]['heldout_top1_accuracy']:.3f}")
    kept, student_mass, results = measure(student, teacher, labels, args.ks, args.temperatures)
    timings["measure_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    timings["total_process_cpu_s"] = time.process_time() - cpu_start

    table = markdown_table(kept, student_mass, results, args.ks)
    tables_by_mass = {f"{T:g}": mass_table(results, T) for T in args.temperatures}
    print()
    print(f"Top-k teacher against the dense teacher: {len(labels)} held-out tokens, vocabulary {teacher.shape[-1]}. "
          "Cells: loss relative error (L_k - L) / L / gradient relative L2 error / gradient cosine.")
    print()
    print(table)
    print()
    for T in args.temperatures:
        print(f"By the teacher's kept mass at temperature 1 (every k pooled), temperature {T:g}. Cells: loss relative "
              "error / gradient cosine, over the (token, k) pairs in the bin.")
        print()
        print(tables_by_mass[f"{T:g}"])
        print()
    log(f"total {timings['total_s']:.1f} s ({', '.join(f'{k} {v:.1f}' for k, v in timings.items())})")

    import tokenizers
    import transformers

    from tgtfast.bench.report import environment

    out = {
        "command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]) if argv is None else None,
        "environment": {**environment(), "cpu_model": cpu_model(), "transformers": transformers.__version__,
                        "tokenizers": tokenizers.__version__},
        "corpus": corpus, "teacher": infos["teacher"], "student": infos["student"],
        "eval": {"tokens": len(labels), "vocab": teacher.shape[-1], "dtype": "float64", "reduction": "batchmean",
                 "backends": backends_used(teacher.device, teacher.dtype)},
        "cached": cached, "timings_s": timings,
        "load_average_1_5_15": {"start": load_start, "end": os.getloadavg()},
        "kept_mass": {f"T={T:g}": {str(k): v for k, v in by_k.items()} for T, by_k in kept.items()},
        "student_mass_on_teacher_topk": {str(k): v for k, v in student_mass.items()},
        "results": results, "markdown_table": table,
        "markdown_tables_by_kept_mass": tables_by_mass,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
        log(f"wrote {args.json}")
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(kept, results, args.ks, args.temperatures, args.plot)
        log(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
