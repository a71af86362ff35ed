"""Benchmarks behind ``tgtfast bench``: every implementation of an op on the same inputs, in one process.

Ops (``--op``; all of them by default):

* ``ptloss``: PTLoss forward+backward (shape ``N, K, M``).
* ``proxy``: the Proxy Teacher coefficient search (``N, K, M`` and ``C`` candidates).
* ``tgt``: the perturb -> decode -> label step of TGT, forward only, and ``tgt_bwd``: with the backward to the
  latent codes (``B``, latent ``D``, decoder ``D -> 256 -> X``, labeler ``X -> 256 -> K``).
* ``fused_linear``: PTLoss from hidden states (``N, H, V``), forward+backward.

For each op and shape, the rows are the eager reference (``eager``), ``torch.compile`` of it (``compile``;
absent where compiling makes no sense) and every backend of the package that can run the inputs. The rows take
turns, one call each per round (:func:`time_in_turns`), so that a change of load on a shared machine hits them
alike. Each row reports the median time with its min-max spread, on the CPU the minor page faults per call, the
speed-ups over eager and over ``torch.compile``, the achieved bytes per second against the copy bandwidth measured in the same run (the memory roofline: the bytes
the op cannot avoid moving, listed per op in :data:`ROOFLINE_BYTES`), the cost per element of the work (flat
when cost grows linearly), peak memory, and whether the result matched the eager reference.

Peak memory on the CPU is measured in a fresh subprocess per row: after a warm-up on tiny inputs the real
inputs are built, the kernel's peak-RSS counter is reset (``/proc/self/clear_refs``), one call runs, and the
peak RSS (``VmHWM``) minus the RSS before it is reported. On a GPU it is ``torch.cuda.max_memory_allocated``
above what the inputs hold.

Sweeps (``--sweep``) run each op over a range of sizes (``SWEEPS``) to show how the cost grows; ``--plot``
draws time and the share of the roofline against the swept size.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

import tgtfast
from tgtfast import reference

IMPLS = ("eager", "compile", "cpp", "triton", "cuda")
GPU_BACKENDS = ("cuda", "triton")

# What each op must move at the least, the basis of the roofline column.
ROOFLINE_BYTES = {
    "ptloss": "read student and teacher logits, write the gradient: 3 N K bytes-per-element",
    "proxy": "none (compute-bound: the inputs are N K float64); no roofline",
    "tgt": "read z and the weights, write x_new and the soft labels",
    "tgt_bwd": "tgt plus read the incoming gradients and write the gradient of z",
    "fused_linear": "read both hidden states and weights, write the student's hidden-state and weight gradients",
}


# ------------------------------------------------------------------------------------------------------------
# timing helpers
# ------------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timeit(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 2) -> List[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_in_turns(fns: Dict[str, Callable[[], Any]], device: torch.device, repeats: int
                  ) -> Tuple[Dict[str, List[float]], Dict[str, List[int]]]:
    """Times one call of each of `fns` per round, `repeats` rounds: the implementations take turns, so that a
    change of load on a shared machine hits them alike and their ratios stay fair. Returns the seconds and the
    minor page faults (fresh memory the kernel maps and zeroes; 0 where unknown) of every call, per name."""
    times: Dict[str, List[float]] = {name: [] for name in fns}
    faults: Dict[str, List[int]] = {name: [] for name in fns}
    _sync(device)
    for _ in range(repeats):
        for name, fn in fns.items():
            f0 = _minor_faults()
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
            faults[name].append(_minor_faults() - f0)
    return times, faults


def copy_bandwidth(nbytes: int, device: torch.device, repeats: int = 9) -> float:
    """Bytes per second moved by ``dst.copy_(src)`` (counting the read and the write), on buffers of `nbytes`
    but at least 64 MiB, so that the roofline is the memory's and not a cache's (or the timer's)."""
    src = torch.ones(max(nbytes, 64 << 20) // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = _timeit(lambda: dst.copy_(src), device, repeats)
    return 2 * src.numel() * 4 / statistics.median(times)


def backend_impls(device: torch.device, dtype: torch.dtype, supported: Sequence[str]) -> List[str]:
    """The package's backends among `supported` that can run tensors of `device` and `dtype` here."""
    avail = tgtfast.backends()
    out = []
    for name in supported:
        if avail.get(name) != "available":
            continue
        if (name in GPU_BACKENDS) != (device.type == "cuda"):
            continue
        out.append(name)
    return out


# ------------------------------------------------------------------------------------------------------------
# ops
# ------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    """One op on one shape: a runner per implementation and how to judge the results.

    run[impl]() performs one timed call (forward, or forward+backward) and returns what :attr:`compare`
    takes; compare(result, reference_result) -> max error, scaled so that ``tol`` separates right from wrong.
    The reference result is truth() when given, else the first row's (the eager reference). Rows in
    ``incomparable`` (eager code that draws different random numbers) are reported without a verdict."""

    op: str
    shape: Dict[str, int]
    dtype: torch.dtype
    device: torch.device
    run: Dict[str, Callable[[], Any]]
    compare: Callable[[Any, Any], float]
    tol: float
    moved_bytes: Optional[int]
    work: int  # elements of work, for the per-element cost
    work_unit: str
    size_key: str  # the shape entry a sweep varies (x axis of the plot)
    truth: Optional[Callable[[], Any]] = None
    incomparable: Sequence[str] = ()


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if a.shape != b.shape:
        return float("inf")
    return float(((a - b).abs() / (1.0 + b.abs())).max()) if a.numel() else 0.0


def _tol(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 3e-2)


def make_inputs(n: int, k: int, m: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    s = (torch.randn(n, k, generator=g) * 3).to(device=device, dtype=dtype)
    t = (torch.randn(n, k, generator=g) * 3).to(device=device, dtype=dtype)
    coeffs = torch.linspace(-0.5, 2.0, m).to(device) if m else None
    return s, t, coeffs


def make_step(impl: str, coeffs: Optional[torch.Tensor]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A function (student, teacher) -> PTLoss running one implementation."""
    if impl == "eager":
        return lambda s, t: reference.ptloss(s, t, coeffs)
    if impl == "compile":
        return torch.compile(lambda s, t: reference.ptloss(s, t, coeffs))
    return lambda s, t: tgtfast.ptloss(s, t, coeffs, backend=impl)


def available_impls(device: torch.device, dtype: torch.dtype) -> List[str]:
    """PTLoss implementations that can run here: eager, compile and the backends."""
    supported = ("cpp", "triton", "cuda") if dtype != torch.float16 or device.type == "cuda" else ()
    return ["eager", "compile"] + backend_impls(device, dtype, supported)


def _fwd_bwd(step, s, t):
    s.grad = None
    loss = step(s, t)
    loss.backward()
    return loss


def _case_ptloss(shape: Dict[str, int], dtype: torch.dtype, device: torch.device, impls: Optional[List[str]]):
    n, k, m = shape["N"], shape["K"], shape["M"]
    s, t, coeffs = make_inputs(n, k, m, dtype, device)
    s.requires_grad_(True)
    run = {}
    for impl in impls or available_impls(device, dtype):
        step = make_step(impl, coeffs)

        def one(step=step):
            loss = _fwd_bwd(step, s, t)
            return loss.detach(), s.grad

        run[impl] = one

    def compare(a, b):
        return max(abs(float(a[0]) - float(b[0])) / max(1.0, abs(float(b[0]))), _err(a[1], b[1]))

    return Case("ptloss", shape, dtype, device, run, compare, _tol(dtype), 3 * n * k * s.element_size(),
                n * k, "elem", "K")


def _case_proxy(shape: Dict[str, int], dtype: torch.dtype, device: torch.device, impls: Optional[List[str]]):
    from tgtfast import proxy

    n, k, m, c = shape["N"], shape["K"], shape["M"], shape["C"]
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(n, k, generator=g, dtype=torch.float64) * 2.0, -1)
    y = torch.multinomial(p.float(), 1, generator=g)[:, 0]
    names = impls or (["eager"] + backend_impls(torch.device("cpu"), torch.float64, ("cpp",)))
    run = {}
    for impl in names:
        backend = "reference" if impl == "eager" else impl
        run[impl] = lambda backend=backend: proxy.search_coefficients(
            p, y, order=m, num_candidates=c, seed=0, backend=backend).candidate_deviations
    return Case("proxy", shape, torch.float64, torch.device("cpu"), run, _err, 1e-9, None, (c + 1) * n,
                "pair", "N")


def _tgt_modules(shape: Dict[str, int], dtype: torch.dtype, device: torch.device):
    """The TGT benchmark teacher: decoder D -> 256 -> X (sigmoid), labeler X -> 256 -> K (ReLU hidden)."""
    nn = torch.nn
    torch.manual_seed(0)
    d, x, k, h = shape["D"], shape["X"], shape["K"], 256
    dec = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, x), nn.Sigmoid())
    lab = nn.Sequential(nn.Linear(x, h), nn.ReLU(), nn.Linear(h, k))
    for mod in (dec, lab):
        mod.to(device=device, dtype=dtype).requires_grad_(False)
    return dec, lab


def _case_tgt(shape: Dict[str, int], dtype: torch.dtype, device: torch.device, impls: Optional[List[str]],
              backward: bool):
    b, d, x, k = shape["B"], shape["D"], shape["X"], shape["K"]
    dec, lab = _tgt_modules(shape, dtype, device)
    z = torch.randn(b, d, device=device, dtype=dtype, generator=None).requires_grad_(backward)
    sigma, seed = 0.5, 1234
    upstream = (torch.randn(b, x, device=device, dtype=dtype), torch.randn(b, k, device=device, dtype=dtype))

    def eager():  # what a user writes: the modules one by one, noise from torch.randn
        z_new = z + sigma * torch.randn_like(z)
        x_new = dec(z_new)
        return x_new, torch.softmax(lab(x_new), -1)

    def finish(out):
        if not backward:
            return out
        z.grad = None
        torch.autograd.backward(out, upstream)
        return out[0].detach(), out[1].detach(), z.grad

    run = {"eager": lambda: finish(eager())}
    compiled = torch.compile(eager)
    run["compile"] = lambda: finish(compiled())
    supported = ("cpp", "triton", "cuda")
    for impl in impls or backend_impls(device, dtype, supported):
        if impl in ("eager", "compile"):
            continue
        run[impl] = lambda impl=impl: finish(tgtfast.perturb_decode_label(z, dec, lab, sigma=sigma, seed=seed,
                                                                          backend=impl))
    if impls:
        run = {name: fn for name, fn in run.items() if name in impls}
    esz = torch.finfo(dtype).bits // 8
    weights = sum(p.numel() for p in list(dec.parameters()) + list(lab.parameters())) * esz
    moved = b * (d + x + k) * esz + weights
    if backward:
        moved += b * (x + k + d) * esz

    def truth():  # the eager composition with the package's noise (tgtfast.reference.perturb_decode_label)
        return finish(reference.perturb_decode_label(z, dec, lab, sigma=sigma, seed=seed))

    def compare(a, ref):
        return max(_err(x, y) for x, y in zip(a, ref))

    return Case("tgt_bwd" if backward else "tgt", shape, dtype, device, run, compare,
                1e-3 if dtype == torch.float32 else 3e-2, moved, b, "sample", "B", truth=truth,
                incomparable=("eager", "compile"))


def _case_fused_linear(shape: Dict[str, int], dtype: torch.dtype, device: torch.device,
                       impls: Optional[List[str]]):
    n, h, v = shape["N"], shape["H"], shape["V"]
    g = torch.Generator(device="cpu").manual_seed(0)
    hs = (torch.randn(n, h, generator=g)).to(device, dtype).requires_grad_(True)
    ws = (torch.randn(v, h, generator=g) / h**0.5).to(device, dtype).requires_grad_(True)
    ht = (torch.randn(n, h, generator=g)).to(device, dtype)
    wt = (torch.randn(v, h, generator=g) / h**0.5).to(device, dtype)
    coeffs = torch.linspace(-0.5, 2.0, 5).to(device)

    def materialised():
        return reference.ptloss(hs @ ws.t(), ht @ wt.t(), coeffs)

    def finish(loss):
        hs.grad = ws.grad = None
        loss.backward()
        return loss.detach(), hs.grad, ws.grad

    run = {"eager": lambda: finish(materialised())}
    compiled = torch.compile(materialised)
    run["compile"] = lambda: finish(compiled())
    for impl in impls or backend_impls(device, dtype, ("cpp", "triton", "cuda")):
        if impl in ("eager", "compile"):
            continue
        run[impl] = lambda impl=impl: finish(tgtfast.fused_linear_ptloss(hs, ws, ht, wt, coeffs, backend=impl))
    if impls:
        run = {name: fn for name, fn in run.items() if name in impls}

    def compare(a, b):
        return max(abs(float(a[0]) - float(b[0])) / max(1.0, abs(float(b[0]))), _err(a[1], b[1]), _err(a[2], b[2]))

    esz = hs.element_size()
    moved = (2 * n * h + 2 * v * h) * esz + (n * h + v * h) * esz
    return Case("fused_linear", shape, dtype, device, run, compare, 2e-3 if dtype == torch.float32 else 5e-2,
                moved, n * v, "logit", "V")


BUILDERS: Dict[str, Callable[..., Case]] = {
    "ptloss": _case_ptloss,
    "proxy": _case_proxy,
    "tgt": lambda shape, dtype, device, impls: _case_tgt(shape, dtype, device, impls, backward=False),
    "tgt_bwd": lambda shape, dtype, device, impls: _case_tgt(shape, dtype, device, impls, backward=True),
    "fused_linear": _case_fused_linear,
}

# The shapes the op issues set targets on: (CPU shapes, GPU shapes).
DEFAULT_SHAPES = {
    "ptloss": ([{"N": 1024, "K": 32000, "M": 5}], [{"N": 4096, "K": 32000, "M": 5}, {"N": 4096, "K": 128256, "M": 5}]),
    "proxy": ([{"N": 10000, "K": 3, "M": 5, "C": 100}],) * 2,
    "tgt": ([{"B": 4096, "D": 64, "X": 784, "K": 10}, {"B": 4096, "D": 64, "X": 784, "K": 1000}],) * 2,
    "tgt_bwd": ([{"B": 4096, "D": 64, "X": 784, "K": 10}, {"B": 4096, "D": 64, "X": 784, "K": 1000}],) * 2,
    "fused_linear": ([{"N": 4096, "H": 1024, "V": 32000}], [{"N": 8192, "H": 4096, "V": 128256}]),
}

# Sizes a sweep runs through (the other entries stay at a small base so a sweep takes minutes, not hours).
SWEEPS = {
    "ptloss": ({"N": 256, "M": 5}, "K", [1024, 4096, 16384, 32000, 65536]),
    "proxy": ({"K": 3, "M": 5, "C": 100}, "N", [1000, 3000, 10000]),
    "tgt": ({"D": 64, "X": 784, "K": 10}, "B", [512, 1024, 2048, 4096]),
    "tgt_bwd": ({"D": 64, "X": 784, "K": 10}, "B", [512, 1024, 2048, 4096]),
    "fused_linear": ({"N": 512, "H": 256}, "V", [4096, 8192, 16384, 32000]),
}


def op_available(op: str) -> Optional[str]:
    """None if `op` exists in this installation, else why not."""
    needs = {"tgt": "perturb_decode_label", "tgt_bwd": "perturb_decode_label", "fused_linear": "fused_linear_ptloss"}
    if op in needs and not hasattr(tgtfast, needs[op]):
        return f"tgtfast.{needs[op]} is not available"
    return None


# ------------------------------------------------------------------------------------------------------------
# peak memory
# ------------------------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _tiny(shape: Dict[str, int]) -> Dict[str, int]:
    return {key: min(val, 8 if key in ("N", "B", "C") else 64) for key, val in shape.items()}


def _peak_memory_child(op: str, impl: str, shape_json: str, dtype: str) -> int:
    """Run in a fresh process: peak RSS growth of one call of `impl` (inputs excluded)."""
    shape = json.loads(shape_json)
    dt = getattr(torch, dtype)
    cpu = torch.device("cpu")
    warm = BUILDERS[op](_tiny(shape), dt, cpu, [impl])  # code paths, thread pools, compilation
    warm.run[impl]()
    warm.run[impl]()
    case = BUILDERS[op](shape, dt, cpu, [impl])
    with open("/proc/self/clear_refs", "w") as fh:  # reset the peak resident set size (VmHWM)
        fh.write("5")
    base = _rss_bytes()
    case.run[impl]()
    return max(_peak_rss_bytes() - base, 0)


def _peak_memory_subprocess(op: str, impl: str, shape: Dict[str, int], dtype: str) -> Optional[int]:
    code = (
        "from tgtfast.bench import _peak_memory_child as f; "
        f"print(f({op!r}, {impl!r}, {json.dumps(json.dumps(shape))}, {dtype!r}))"
    )
    env = dict(os.environ, TGTFAST_QUIET="1")
    # run from the folder that holds this tgtfast, so that the child imports the same package (and its build)
    # whatever the working directory is (from a source checkout, `-c` would put the unbuilt tree first)
    here = os.path.dirname(os.path.dirname(os.path.abspath(tgtfast.__file__)))
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800,
                             cwd=here)
        return int(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


# ------------------------------------------------------------------------------------------------------------
# running
# ------------------------------------------------------------------------------------------------------------


def run_case(op: str, shape: Dict[str, int], dtype: torch.dtype = torch.float32,
             device: Optional[torch.device] = None, repeats: int = 7, memory: bool = True,
             impls: Optional[List[str]] = None, bandwidth: Optional[float] = None) -> Dict:
    """Benchmark every implementation of `op` on one shape; returns a JSON-able dict."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    case = BUILDERS[op](shape, dtype, device, impls)
    if bandwidth is None and case.moved_bytes:
        bandwidth = copy_bandwidth(case.moved_bytes // 3, case.device)
    rows = []
    truth = None
    if case.truth is not None:
        truth = case.truth()
    errs = {}
    for impl, fn in case.run.items():
        out = fn()
        if truth is None:
            truth = out
        errs[impl] = None if impl in case.incomparable else case.compare(out, truth)
        del out
        fn()  # warm-up
    times, faults = time_in_turns(case.run, case.device, repeats)
    for impl, fn in case.run.items():
        err = errs[impl]
        med = statistics.median(times[impl])
        row: Dict[str, Any] = {
            "impl": impl,
            "median_s": med,
            "min_s": min(times[impl]),
            "max_s": max(times[impl]),
            "ns_per_" + case.work_unit: med / max(case.work, 1) * 1e9,
            "max_err_vs_reference": err,
            "matches_reference": None if err is None else bool(err <= case.tol),
        }
        if case.device.type == "cpu":
            row["page_faults_per_call"] = statistics.median(faults[impl])
        if case.moved_bytes:
            row["bytes_per_s"] = case.moved_bytes / med
            row["roofline_fraction"] = case.moved_bytes / med / bandwidth
        if case.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            row["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
        elif memory:
            row["peak_extra_bytes"] = _peak_memory_subprocess(op, impl, shape, str(case.dtype).split(".")[-1])
        rows.append(row)
    by = {r["impl"]: r for r in rows}
    for r in rows:
        r["speedup_vs_eager"] = by["eager"]["median_s"] / r["median_s"] if "eager" in by else None
        r["speedup_vs_compile"] = by["compile"]["median_s"] / r["median_s"] if "compile" in by else None
        if op == "ptloss" and r.get("peak_extra_bytes") is not None:
            r["peak_extra_vs_logits"] = r["peak_extra_bytes"] / (shape["N"] * shape["K"] * torch.finfo(dtype).bits // 8)
    return {
        "op": op,
        "shape": dict(shape),
        "dtype": str(case.dtype).split(".")[-1],
        "device": device_name(case.device),
        "copy_bandwidth_bytes_per_s": bandwidth if case.moved_bytes else None,
        "moved_bytes": case.moved_bytes,
        "ideal_time_s": case.moved_bytes / bandwidth if case.moved_bytes else None,
        "work_unit": case.work_unit,
        "size_key": case.size_key,
        "rows": rows,
    }


def run_ptloss(n: int = 1024, k: int = 32000, m: int = 5, dtype: torch.dtype = torch.float32,
               device: Optional[torch.device] = None, repeats: int = 7, memory: bool = True,
               impls: Optional[List[str]] = None) -> Dict:
    """Benchmark PTLoss forward+backward on one shape (see :func:`run_case`)."""
    return run_case("ptloss", {"N": n, "K": k, "M": m}, dtype, device, repeats, memory, impls)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def environment() -> Dict[str, Optional[str]]:
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
        "cpu_isa": tgtfast._ext.ext.cpu_isa() if tgtfast._ext.ext is not None else None,
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


def plot(results: List[Dict], path: str) -> None:
    """Time and share of the roofline against the swept size, one panel pair per op."""
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


def _parse_shape(items: Sequence[str]) -> Dict[str, int]:
    out = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or not key or not val.lstrip("-").isdigit():
            raise SystemExit(f"tgtfast bench: --shape takes KEY=INT entries, got {item!r}")
        out[key.upper()] = int(val)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="tgtfast bench", description="Benchmark the fused ops of tgtfast.")
    parser.add_argument("--op", nargs="+", choices=list(BUILDERS), help="ops to run (default: all available)")
    parser.add_argument("--shape", nargs="+", default=[], metavar="KEY=INT",
                        help="override shape entries, e.g. --shape N=64 K=4096 (per op: see DEFAULT_SHAPES)")
    parser.add_argument("--n", type=int, help="PTLoss rows N (same as --shape N=...)")
    parser.add_argument("--k", type=int, nargs="+", help="PTLoss classes K; several values run one after another")
    parser.add_argument("--m", type=int, help="PTLoss orders M")
    parser.add_argument("--sweep", action="store_true", help="run each op over the sizes in SWEEPS")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--impl", nargs="+", choices=IMPLS, help="implementations to run (default: all available)")
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--plot", help="write a PNG of time and roofline share against the swept size")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    dtype = getattr(torch, args.dtype)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ops = args.op or list(BUILDERS)
    override = _parse_shape(args.shape)
    ptloss_flags = {key: val for key, val in (("N", args.n), ("M", args.m)) if val is not None}
    results = []
    for op in ops:
        why = op_available(op)
        if why is not None:
            print(f"{op}: skipped ({why})\n", flush=True)
            continue
        defaults = DEFAULT_SHAPES[op][device.type == "cuda"]
        if args.sweep:
            fixed, key, sizes = SWEEPS[op]
            shapes = [{**defaults[0], **fixed, key: size} for size in sizes]
        else:
            shapes = [dict(s) for s in defaults]
        if op == "ptloss":
            shapes = [{**s, **ptloss_flags} for s in shapes]
            if args.k:
                shapes = [{**s, "K": k} for s in shapes[:1] for k in args.k]
        swept = SWEEPS[op][1] if args.sweep else None
        shapes = [{**s, **{k: v for k, v in override.items() if k in s and k != swept}} for s in shapes]
        for shape in shapes:
            res = run_case(op, shape, dtype, device, args.repeats, not args.no_memory, args.impl)
            print(format_table(res) + "\n", flush=True)
            results.append(res)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"environment": environment(), "results": results}, fh, indent=2)
    if args.plot and results:
        plot(results, args.plot)
    return 0
