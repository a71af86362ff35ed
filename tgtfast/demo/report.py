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


def baseline_of(method: str, loss: str, cfg: DemoConfig, regime: str = "strong") -> Optional[Tuple[str, str]]:
    """The row a row is compared with. First regime: ``kd`` with the same distillation loss (``kd``/``kl`` for
    ``onehot``); second regime: ``kd``/``kl`` (KL at the picked temperature) for every row. None for the
    baseline itself or when it is not run."""
    if regime == "weak":
        return None if (method, loss) == (BASELINE, "kl") else (BASELINE, "kl")
    if method == BASELINE:
        return None
    base = (BASELINE, "kl" if loss == "-" else loss)
    return base if base in rows(cfg) else None


def summarise(runs: Sequence[Dict[str, Any]], cfg: DemoConfig, regime: str = "strong") -> List[Dict[str, Any]]:
    """Per (method, loss, budget) of ``regime``: test accuracy, ECE and NLL (mean and std over seeds), validation
    accuracy, and the paired difference of test accuracy to the baseline row (:func:`baseline_of`) over the seeds
    both ran (same labelled subset and same initial student per seed)."""
    by_key = {(r["method"], r["loss"], r["budget"], r["seed"]): r for r in runs}
    out = []
    for method, loss in rows(cfg, regime):
        for b in (cfg.weak_budgets if regime == "weak" else cfg.budgets):
            mine = [r for r in runs if (r["method"], r["loss"], r["budget"]) == (method, loss, b)]
            if not mine:
                continue
            row: Dict[str, Any] = {"method": method, "loss": loss, "budget": b, "seeds": len(mine)}
            for key, name in (("test_accuracy", "test"), ("test_ece", "ece"), ("test_nll", "nll"),
                              ("val_accuracy", "val")):
                vals = [r[key] for r in mine if key in r]
                if vals:
                    row[f"{name}_mean"], row[f"{name}_std"] = _mean_std(vals)
            base = baseline_of(method, loss, cfg, regime)
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
    return "\n".join(lines + _blocks(summary, cfg, "strong"))


def _blocks(summary: Sequence[Dict[str, Any]], cfg: DemoConfig, regime: str) -> List[str]:
    """One block of rows per label budget of ``regime``."""
    lines: List[str] = []
    header = f"{'method':<16}{'loss':<8}{'accuracy %':>13}{'Δ kd (points)':>16}{'ECE %':>13}{'NLL':>15}"
    by_key = {(s["method"], s["loss"], s["budget"]): s for s in summary}
    for b in (cfg.weak_budgets if regime == "weak" else cfg.budgets):
        lines += ["", f"n = {b} labelled examples", header, "-" * len(header)]
        for method, loss in rows(cfg, regime):
            s = by_key.get((method, loss, b))
            lines.append(f"{method:<16}{loss:<8}{_cell(s, 'test', 100, '5.1f', '4.1f'):>13}"
                         f"{_cell(s, 'delta', 100, '+5.1f', '4.1f'):>16}{_cell(s, 'ece', 100, '5.1f', '4.1f'):>13}"
                         f"{_cell(s, 'nll', 1, '6.3f', '5.3f'):>15}")
    return lines


def format_weak_table(weak: Dict[str, Any], cfg: DemoConfig, test_size: int) -> str:
    """The second regime's block: the overconfident teacher's test accuracy and ECE, the temperature picked on
    validation, then its rows per budget (Δ kd: paired difference to KL distillation at that temperature)."""
    t = weak["teacher"]
    search = ", ".join(f"T = {e['temperature']:g}: {100 * e['val_accuracy_mean']:.1f} %" for e in weak["temperature_search"])
    seeds = f"{len(cfg.seeds)} seed{'s' if len(cfg.seeds) != 1 else ''}"
    lines = [
        f"Second regime: an overconfident teacher, the labeler trained on {t['labels']} labels only: test accuracy "
        f"{100 * t['labeler_test_accuracy']:.1f} %, ECE {100 * t['labeler_test_ece']:.1f} % (mean confidence "
        f"{100 * t['labeler_test_mean_confidence']:.1f} %), NLL {t['labeler_test_nll']:.3f}",
        f"Every row distils on its labelled inputs and on TGT random samples; temperature T = {weak['temperature']:g}"
        f" for every row, picked by KL's mean validation accuracy ({search}); Δ kd: paired difference to kd (KL) in "
        f"points; {test_size} test images, mean ± std over {seeds}",
    ]
    return "\n".join(lines + _blocks(weak["summary"], cfg, "weak"))


_COLORS = {"onehot": "tab:gray", "kd": "tab:blue", "real-unlabelled": "tab:purple", "input-noise": "tab:brown",
           "tgt-random": "tab:orange", "tgt-gradient": "tab:green"}


def plot_results(summary: Sequence[Dict[str, Any]], cfg: DemoConfig, teacher_acc: float, path: str,
                 teacher_ece: Optional[float] = None, weak: Optional[Dict[str, Any]] = None) -> None:
    """First regime: three panels against the label budget, test accuracy, its paired difference to KD, and ECE;
    one line per method and loss (mean ± std over seeds), the teacher dotted. Second regime (``weak``, the
    summary and teacher of :func:`format_weak_table`): the same three quantities as bars per row and budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strong = "strong" in cfg.regimes
    n_rows = int(strong) + int(weak is not None)
    fig, axes = plt.subplots(n_rows, 3, figsize=(16, 4.8 * n_rows), squeeze=False)
    panels = (("test", "test accuracy (%)"), ("delta", "accuracy - kd, same seed (points)"), ("ece", "ECE (%)"))
    if strong:
        _plot_strong(axes[0], summary, cfg, panels, {"test": teacher_acc, "ece": teacher_ece})
        axes[0][0].set_title("teacher trained on every teacher-train label", fontsize=9)
    if weak is not None:
        t = weak["teacher"]
        _plot_weak(axes[n_rows - 1], weak["summary"], cfg, panels,
                   {"test": t["labeler_test_accuracy"], "ece": t["labeler_test_ece"]})
        axes[n_rows - 1][0].set_title(f"overconfident teacher ({t['labels']} labels), TGT random, "
                                      f"T = {weak['temperature']:g}", fontsize=9)
    fig.suptitle(f"Digits: students with few labels ({len(cfg.seeds)} seeds, mean ± std)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_strong(axes, summary, cfg: DemoConfig, panels, teacher: Dict[str, Optional[float]]) -> None:
    import matplotlib.ticker

    for ax, (name, label) in zip(axes, panels):
        for method, loss in rows(cfg):
            pts = sorted((s["budget"], s[f"{name}_mean"], s[f"{name}_std"]) for s in summary
                         if s["method"] == method and s["loss"] == loss and f"{name}_mean" in s)
            if not pts:
                continue
            b, m, e = zip(*pts)
            ax.errorbar(b, [100 * v for v in m], yerr=[100 * v for v in e], color=_COLORS.get(method, "black"),
                        capsize=3, linestyle="--" if loss == "ptloss" else "-", marker="s" if loss == "ptloss" else "o",
                        label=method if loss == "-" else f"{method} ({loss})")
        if teacher.get(name) is not None:
            ax.axhline(100 * teacher[name], color="black", linestyle=":", label="teacher")
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


def _plot_weak(axes, summary, cfg: DemoConfig, panels, teacher: Dict[str, Optional[float]]) -> None:
    names = [f"{m} ({lo})" for m, lo in rows(cfg, "weak")]
    width = 0.8 / len(cfg.weak_budgets)
    for ax, (name, label) in zip(axes, panels):
        for j, b in enumerate(cfg.weak_budgets):
            by = {(s["method"], s["loss"]): s for s in summary if s["budget"] == b}
            vals = [by.get(r, {}) for r in rows(cfg, "weak")]
            xs = [i + (j - (len(cfg.weak_budgets) - 1) / 2) * width for i in range(len(names))]
            ax.bar(xs, [100 * v.get(f"{name}_mean", float("nan")) for v in vals], width,
                   yerr=[100 * v.get(f"{name}_std", 0.0) for v in vals], capsize=3, label=f"n = {b}")
        if teacher.get(name) is not None:
            ax.axhline(100 * teacher[name], color="black", linestyle=":", label="teacher")
        if name == "test":  # accuracies are far from 0: show the differences between the bars
            lows = [100 * s["test_mean"] for s in summary if "test_mean" in s]
            ax.set_ylim(bottom=max(0.0, min(lows, default=10.0) - 10.0), top=100.0)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=20, fontsize=8)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7, loc="lower right")


def _atomic_write_text(path: str, text: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
