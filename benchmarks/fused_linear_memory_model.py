"""Peak memory of fused linear PTLoss at a shape no CPU can run, without running it: the materialised eager
loss (``reference.ptloss(hs @ ws.T, ht @ wt.T, coeffs)`` and its backward) traced on the meta device, and the fused
path's buffers counted from the constants of tgtfast/losses/chunked.py as its CUDA path allocates them.

    python benchmarks/fused_linear_memory_model.py --shape N=8192 H=4096 V=128256 --dtype bfloat16

The materialised figure is the peak of the bytes held by tensors that the ops create (a dispatch mode follows every
storage until it is freed), which is what the CUDA caching allocator's ``max_memory_allocated`` reports above the
inputs, less its block rounding. The fused figure is a sum of the buffers listed; ``tgtfast bench --op
fused_linear`` on a GPU measures both for real (benchmarks/gpu_check.sh runs it at this shape).
"""

from __future__ import annotations

import argparse
from typing import Dict, List, Tuple

import torch

from tgtfast import reference
from tgtfast.bench.memory import LiveBytes
from tgtfast.losses import chunked

MiB = 2**20


def materialised_peak(n: int, h: int, v: int, dtype: torch.dtype, orders: int = 5) -> int:
    """Peak bytes of the eager materialised PTLoss, forward and backward, on the meta device."""
    hs = torch.empty(n, h, device="meta", dtype=dtype).requires_grad_(True)
    ws = torch.empty(v, h, device="meta", dtype=dtype).requires_grad_(True)
    ht, wt = torch.empty(n, h, device="meta", dtype=dtype), torch.empty(v, h, device="meta", dtype=dtype)
    coeffs = torch.empty(orders, device="meta")
    mode = LiveBytes()
    with mode:
        reference.ptloss(hs @ ws.t(), ht @ wt.t(), coeffs).backward()
    return mode.peak


def fused_buffers(n: int, h: int, v: int, dtype: torch.dtype, grouped: bool = True) -> List[Tuple[str, int]]:
    """The fused path's buffers on CUDA (products in the input dtype with float32 outputs), as chunked.py sizes
    them; ``grouped=False``: the float32 accumulator it replaced."""
    esz = dtype.itemsize
    chunk = min(chunked.default_chunk_size(v), n)
    out = [("student and teacher logits of a chunk (float32)", 2 * chunk * v * 4),
           ("the chunk's logit gradient from the row kernel (float32)", chunk * v * 4),
           ("its rounding to the weight's dtype (the GEMM operand)", chunk * v * esz),
           ("hidden-state gradient", n * h * esz),
           ("weight gradient (the result)", v * h * esz)]
    low = dtype in (torch.float16, torch.bfloat16)
    rows, slab = chunked.weight_grad_plan(v, h, n, chunk, dtype, torch.float32, dtype)  # CUDA: operands in dtype
    if grouped and rows:
        out += [(f"group of {rows} rows' logit gradients and hidden rows", rows * (v + h) * esz),
                (f"float32 slab of {slab} weight-gradient rows", slab * h * 4)]
    elif low:
        out += [("float32 weight-gradient accumulator", v * h * 4)]  # alive with the result while it is rounded
    return out


def main(argv=None) -> Dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", nargs="+", default=["N=8192", "H=4096", "V=128256"], metavar="KEY=INT")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)
    shape = {k: int(x) for k, x in (item.split("=") for item in args.shape)}
    n, h, v, dtype = shape["N"], shape["H"], shape["V"], getattr(torch, args.dtype)
    eager = materialised_peak(n, h, v, dtype)
    print(f"N={n} H={h} V={v} {args.dtype}: materialised eager peak {eager / MiB:,.0f} MiB (meta-device trace)")
    result = {"materialised_mib": eager / MiB}
    for name, grouped in (("fused, weight gradient in groups", True), ("fused, float32 accumulator", False)):
        bufs = fused_buffers(n, h, v, dtype, grouped)
        total = sum(b for _, b in bufs)
        print(f"\n{name}: {total / MiB:,.0f} MiB = {100 * total / eager:.1f}% of the materialised peak")
        for what, b in bufs:
            print(f"  {b / MiB:10,.0f} MiB  {what}")
        result[name] = total / MiB
    return result


if __name__ == "__main__":
    main()
