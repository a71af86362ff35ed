"""The demo's outputs: the summary over seeds, the printed table, ``results.png`` and the atomic write of
``results.json``."""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any, Dict, List, Sequence, Tuple

from tgtfast.demo.config import NUM_CLASSES, NUM_PIXELS, DemoConfig
from tgtfast.demo.students import rows


def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def summarise(runs: Sequence[Dict[str, Any]], cfg: DemoConfig) -> List[Dict[str, Any]]:
    out = []
    for method, loss in rows(cfg):
        for b in cfg.budgets:
            accs = [r["test_accuracy"] for r in runs if (r["method"], r["loss"], r["budget"]) == (method, loss, b)]
            vals = [r["val_accuracy"] for r in runs if (r["method"], r["loss"], r["budget"]) == (method, loss, b)]
            if not accs:
                continue
            mean, std = _mean_std(accs)
            vmean, _ = _mean_std(vals)
            out.append({"method": method, "loss": loss, "budget": b, "test_mean": mean, "test_std": std,
                        "val_mean": vmean, "seeds": len(accs)})
    return out


def format_table(summary: Sequence[Dict[str, Any]], cfg: DemoConfig, teacher_metrics: Dict[str, float],
                 test_size: int, train_size: int) -> str:
    """The printed table: rows method x loss, columns label budgets, test accuracy in percent (mean ± std)."""
    lines = [
        f"Test accuracy (%) of {NUM_PIXELS}-{cfg.student_hidden}-{NUM_CLASSES} students on {test_size} test images, "
        f"mean ± std over {len(cfg.seeds)} seed{'s' if len(cfg.seeds) != 1 else ''}",
        f"Teacher labeler {NUM_PIXELS}-{'-'.join(map(str, cfg.labeler_hidden))}-{NUM_CLASSES} trained on "
        f"{train_size} labels: {100 * teacher_metrics['labeler_test_accuracy']:.1f}",
        "",
    ]
    header = f"{'method':<14}{'loss':<8}" + "".join(f"{f'n={b}':>14}" for b in cfg.budgets) + f"{'teacher':>10}"
    lines += [header, "-" * len(header)]
    by_key = {(s["method"], s["loss"], s["budget"]): s for s in summary}
    for method, loss in rows(cfg):
        cells = []
        for b in cfg.budgets:
            s = by_key.get((method, loss, b))
            cells.append(f"{100 * s['test_mean']:6.1f} ± {100 * s['test_std']:4.1f}" if s else f"{'-':>13}")
        lines.append(f"{method:<14}{loss:<8}" + "".join(f"{c:>14}" for c in cells)
                     + f"{100 * teacher_metrics['labeler_test_accuracy']:>10.1f}")
    return "\n".join(lines)


def plot_results(summary: Sequence[Dict[str, Any]], cfg: DemoConfig, teacher_acc: float, path: str) -> None:
    """Test accuracy against the label budget, one line per method and loss, teacher as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    colors = {"onehot": "tab:gray", "kd": "tab:blue", "tgt-random": "tab:orange", "tgt-gradient": "tab:green"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, loss in rows(cfg):
        pts = sorted((s["budget"], s["test_mean"], s["test_std"]) for s in summary
                     if s["method"] == method and s["loss"] == loss)
        if not pts:
            continue
        b, m, e = zip(*pts)
        ax.errorbar(b, [100 * v for v in m], yerr=[100 * v for v in e], color=colors[method], capsize=3,
                    linestyle="--" if loss == "ptloss" else "-", marker="o" if loss != "ptloss" else "s",
                    label=method if loss == "-" else f"{method} ({loss})")
    ax.axhline(100 * teacher_acc, color="black", linestyle=":", label="teacher")
    ax.set_xscale("log")
    ax.set_xticks(list(cfg.budgets))
    ax.set_xticklabels([str(b) for b in cfg.budgets])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("labelled examples seen by the student")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Digits: students with few labels ({len(cfg.seeds)} seeds, mean ± std)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _atomic_write_text(path: str, text: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
