"""The demo's outputs: the summary over seeds, the printed table, ``results.png`` and the atomic write of
``results.json``."""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

from tgtfast.demo.config import BASELINE, NUM_CLASSES, NUM_PIXELS, DemoConfig
from tgtfast.demo.students import rows


def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def baseline_of(method: str, loss: str, cfg: DemoConfig) -> Optional[Tuple[str, str]]:
    """The row a row is compared with: ``kd`` with the same distillation loss (``kd``/``kl`` for ``onehot``);
    None for the ``kd`` rows themselves or when that row is not run."""
    if method == BASELINE:
        return None
    base = (BASELINE, "kl" if loss == "-" else loss)
    return base if base in rows(cfg) else None


def summarise(runs: Sequence[Dict[str, Any]], cfg: DemoConfig) -> List[Dict[str, Any]]:
    """Per (method, loss, budget): test accuracy, ECE and NLL (mean and std over seeds), validation accuracy, and
    the paired difference of test accuracy to the baseline row (:func:`baseline_of`) over the seeds both ran
    (same labelled subset and same initial student per seed)."""
    by_key = {(r["method"], r["loss"], r["budget"], r["seed"]): r for r in runs}
    out = []
    for method, loss in rows(cfg):
        for b in cfg.budgets:
            mine = [r for r in runs if (r["method"], r["loss"], r["budget"]) == (method, loss, b)]
            if not mine:
                continue
            row: Dict[str, Any] = {"method": method, "loss": loss, "budget": b, "seeds": len(mine)}
            for key, name in (("test_accuracy", "test"), ("test_ece", "ece"), ("test_nll", "nll"),
                              ("val_accuracy", "val")):
                vals = [r[key] for r in mine if key in r]
                if vals:
                    row[f"{name}_mean"], row[f"{name}_std"] = _mean_std(vals)
            base = baseline_of(method, loss, cfg)
            if base is not None:
                diffs = [r["test_accuracy"] - by_key[base + (b, r["seed"])]["test_accuracy"] for r in mine
                         if base + (b, r["seed"]) in by_key]
                if diffs:
                    row["baseline"] = list(base)
                    row["delta_mean"], row["delta_std"] = _mean_std(diffs)
                    row["delta_seeds"] = len(diffs)
            out.append(row)
    return out


def _cell(s: Optional[Dict[str, Any]], name: str, scale: float, fmt: str, std_fmt: str) -> str:
    if s is None or f"{name}_mean" not in s:
        return "-"
    return f"{scale * s[f'{name}_mean']:{fmt}} ± {scale * s[f'{name}_std']:{std_fmt}}"


def format_table(summary: Sequence[Dict[str, Any]], cfg: DemoConfig, teacher_metrics: Dict[str, float],
                 test_size: int, train_size: int) -> str:
    """The printed table: one block per label budget, rows method x loss; test accuracy (%), its paired difference
    to KD with the same loss (percentage points), ECE (%) and NLL, each mean ± std over the seeds."""
    seeds = f"{len(cfg.seeds)} seed{'s' if len(cfg.seeds) != 1 else ''}"
    lines = [
        f"{NUM_PIXELS}-{cfg.student_hidden}-{NUM_CLASSES} students on {test_size} test images, mean ± std over "
        f"{seeds}; Δ kd: paired difference of accuracy to kd with the same loss (onehot: to kd with KL), in "
        f"points; ECE: {cfg.ece_bins} equal-width bins",
        f"Teacher labeler {NUM_PIXELS}-{'-'.join(map(str, cfg.labeler_hidden))}-{NUM_CLASSES} trained on "
        f"{train_size} labels: accuracy {100 * teacher_metrics['labeler_test_accuracy']:.1f} %"
        + (f", ECE {100 * teacher_metrics['labeler_test_ece']:.1f} %, NLL {teacher_metrics['labeler_test_nll']:.3f}"
           if "labeler_test_ece" in teacher_metrics else ""),
    ]
    header = f"{'method':<16}{'loss':<8}{'accuracy %':>13}{'Δ kd (points)':>16}{'ECE %':>13}{'NLL':>15}"
    by_key = {(s["method"], s["loss"], s["budget"]): s for s in summary}
    for b in cfg.budgets:
        lines += ["", f"n = {b} labelled examples", header, "-" * len(header)]
        for method, loss in rows(cfg):
            s = by_key.get((method, loss, b))
            lines.append(f"{method:<16}{loss:<8}{_cell(s, 'test', 100, '5.1f', '4.1f'):>13}"
                         f"{_cell(s, 'delta', 100, '+5.1f', '4.1f'):>16}{_cell(s, 'ece', 100, '5.1f', '4.1f'):>13}"
                         f"{_cell(s, 'nll', 1, '6.3f', '5.3f'):>15}")
    return "\n".join(lines)


_COLORS = {"onehot": "tab:gray", "kd": "tab:blue", "real-unlabelled": "tab:purple", "input-noise": "tab:brown",
           "tgt-random": "tab:orange", "tgt-gradient": "tab:green"}


def plot_results(summary: Sequence[Dict[str, Any]], cfg: DemoConfig, teacher_acc: float, path: str,
                 teacher_ece: Optional[float] = None) -> None:
    """Three panels against the label budget: test accuracy, its paired difference to KD, and ECE; one line per
    method and loss (mean ± std over seeds), the teacher dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    panels = (("test", "test accuracy (%)", teacher_acc), ("delta", "accuracy - kd, same seed (points)", None),
              ("ece", "ECE (%)", teacher_ece))
    for ax, (name, label, teacher) in zip(axes, panels):
        for method, loss in rows(cfg):
            pts = sorted((s["budget"], s[f"{name}_mean"], s[f"{name}_std"]) for s in summary
                         if s["method"] == method and s["loss"] == loss and f"{name}_mean" in s)
            if not pts:
                continue
            b, m, e = zip(*pts)
            ax.errorbar(b, [100 * v for v in m], yerr=[100 * v for v in e], color=_COLORS.get(method, "black"),
                        capsize=3, linestyle="--" if loss == "ptloss" else "-", marker="s" if loss == "ptloss" else "o",
                        label=method if loss == "-" else f"{method} ({loss})")
        if teacher is not None:
            ax.axhline(100 * teacher, color="black", linestyle=":", label="teacher")
        if name == "delta":
            ax.axhline(0.0, color="tab:blue", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xticks(list(cfg.budgets))
        ax.set_xticklabels([str(b) for b in cfg.budgets])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("labelled examples seen by the student")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Digits: students with few labels ({len(cfg.seeds)} seeds, mean ± std)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _atomic_write_text(path: str, text: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
