"""What ``tgtfast bench`` reports: the table per op and shape, the environment for the JSON file, the sweep plot."""

from __future__ import annotations

import platform
from typing import Dict, List, Optional

import torch


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's with the torch thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def _cpu_isa() -> Optional[str]:
    """The instruction set the C++ extension dispatches to (a private helper of tgtfast._ext; None without it)."""
    try:
        from tgtfast._ext import ext
    except ImportError:
        return None
    return ext.cpu_isa() if ext is not None and hasattr(ext, "cpu_isa") else None


def environment() -> Dict[str, Optional[str]]:
    """Versions, the CPU's instruction set for the C++ ops, threads and GPU: the ``environment`` of the JSON file."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_isa": _cpu_isa(),
        "threads": str(torch.get_num_threads()),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def _fmt_bytes(b: Optional[int]) -> str:
    if b is None:
        return "-"
    return f"{b / 2**20:.0f} MiB" if b >= 2**20 else f"{b / 2**10:.0f} KiB"


def _fmt_ratio(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}"


def format_table(result: Dict) -> str:
    """The table of one op on one shape: a row per implementation (the ``import`` op: a row per module)."""
    if result["op"] == "import":
        return format_import_table(result)
    shape = " ".join(f"{k}={v}" for k, v in result["shape"].items())
    head = f"{result['op']}  {shape}  {result['dtype']} on {result['device']}\n"
    if result["moved_bytes"]:
        head += (f"copy bandwidth {result['copy_bandwidth_bytes_per_s'] / 1e9:.2f} GB/s -> ideal "
                 f"{result['ideal_time_s'] * 1e3:.2f} ms for {_fmt_bytes(result['moved_bytes'])}\n")
    unit = "ns/" + result["work_unit"]
    cols = (f"{'impl':<9}{'median ms':>11}{'spread ms':>17}{'x eager':>9}{'x compile':>10}{unit:>11}{'GB/s':>8}"
            f"{'roofline':>9}{'peak':>10}{'match':>7}{'faults':>8}\n")
    lines = []
    for r in result["rows"]:
        spread = f"{r['min_s'] * 1e3:.1f}-{r['max_s'] * 1e3:.1f}"
        gbs = f"{r['bytes_per_s'] / 1e9:.2f}" if "bytes_per_s" in r else "-"
        roof = f"{r['roofline_fraction'] * 100:.0f}%" if "roofline_fraction" in r else "-"
        lines.append(
            f"{r['impl']:<9}{r['median_s'] * 1e3:>11.2f}{spread:>17}"
            f"{_fmt_ratio(r['speedup_vs_eager']):>9}{_fmt_ratio(r['speedup_vs_compile']):>10}"
            f"{r['ns_per_' + result['work_unit']]:>11.4g}{gbs:>8}{roof:>9}{_fmt_bytes(r.get('peak_extra_bytes')):>10}"
            f"{ {True: 'yes', False: 'NO', None: 'n/a'}[r['matches_reference']]:>7}"
            f"{r.get('page_faults_per_call', '-'):>8}"
        )
    return head + cols + "\n".join(lines)


def format_import_table(result: Dict) -> str:
    """The ``import`` section (:func:`tgtfast.bench.run_import`): fresh-process import times and the cost of
    ``import tgtfast`` over ``import torch`` against its target."""
    head = (f"import  {result['repeats']} fresh processes per module, in turns, on {result['device']}\n"
            f"{'impl':<9}{'median ms':>11}{'spread ms':>17}{'over torch ms':>15}\n")
    lines = []
    for r in result["rows"]:
        spread = f"{r['min_s'] * 1e3:.0f}-{r['max_s'] * 1e3:.0f}"
        over = "-" if r["over_torch_s"] is None else f"{r['over_torch_s'] * 1e3:.0f}"
        lines.append(f"{r['impl']:<9}{r['median_s'] * 1e3:>11.0f}{spread:>17}{over:>15}")
    verdict = "met" if result["meets_target"] else "NOT met"
    lines.append(f"import tgtfast costs {result['over_torch_s']:.3f} s over import torch "
                 f"(target <= {result['target_s']:.1f} s: {verdict})")
    return head + "\n".join(lines)


def plot(results: List[Dict], path: str) -> None:
    """Time and share of the roofline against the swept size, one panel pair per op."""
    results = [r for r in results if r.get("size_key")]  # the import op has no size to plot against
    if not results:
        raise ValueError("nothing to plot: no op with a size among the results")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(dict.fromkeys(r["op"] for r in results))
    fig, axes = plt.subplots(len(ops), 2, figsize=(11, 3.6 * len(ops)), squeeze=False)
    for row, op in enumerate(ops):
        res = [r for r in results if r["op"] == op]
        key = res[0]["size_key"]
        impls = list(dict.fromkeys(x["impl"] for r in res for x in r["rows"]))
        for impl in impls:
            pts = [(r["shape"][key], x) for r in res for x in r["rows"] if x["impl"] == impl]
            xs = [p[0] for p in pts]
            axes[row][0].plot(xs, [p[1]["median_s"] * 1e3 for p in pts], "o-", label=impl)
            if all("roofline_fraction" in p[1] for p in pts):
                axes[row][1].plot(xs, [p[1]["roofline_fraction"] * 100 for p in pts], "o-", label=impl)
        axes[row][0].set(xlabel=key, ylabel="median time (ms)", title=f"{op}: time", xscale="log", yscale="log")
        axes[row][1].set(xlabel=key, ylabel="% of copy bandwidth", title=f"{op}: share of the memory roofline",
                         xscale="log")
        for ax in axes[row]:
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
    fig.suptitle(f"tgtfast bench on {results[0]['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
