"""``tgtfast bench --op tgt`` / ``tgt_bwd``: Teacher Guided Training's perturb -> decode -> label step (the noise
and the fused MLP chain), forward only or with the backward to the latent codes."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

import tgtfast
from tgtfast import reference
from tgtfast.bench.case import Case, _err, backend_impls


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
