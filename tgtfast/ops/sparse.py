"""The ``sparse`` ops: a dense student's logits coarse-grained to a sparse (top-k) teacher's kept classes plus one
tail bucket, and its gradient (docs/design.md, "Sparse teachers").

Everything about registering them lives here: the C++/CUDA ops ``tgtfast::sparse_coarse_fwd`` and
``sparse_coarse_bwd`` (schemas in csrc/ops.cpp, kernels in csrc/sparse/ and csrc/cuda/sparse_cuda*), their fake
kernels and autograd (the forward op's backward is the backward op), the Triton ops (kernels/sparse.py, registered
the first time the Triton backend is chosen) and the dispatcher entry ``"sparse_coarse"``.

The divergence between the coarse student and the sparse teacher then runs on the ``divergence`` op (``[N, k + 1]``
is small); only these two ops touch ``[N, V]``: one read of the student logits forward, one read and one write of
their gradient backward.

On the CPU the whole loss is one op, ``tgtfast::sparse_divergence_fwd``: per row it checks the teacher, coarse-grains
the student, runs the divergence kernel on the ``k + 1`` classes and writes the gradient while the row is in cache (one
read of the logits and one write of the gradient); like the ``divergence`` op it returns the gradient of the loss
computed in the forward pass, and its backward hands it on (times the incoming gradient when that is not 1).

``tgtfast::sparse_topk`` (CPU, dispatcher entry ``"sparse_topk"``) is the teacher cache's reduction: the top k of
the teacher's log-softmax in one sweep per row (tgtfast/cache/writer.py).
"""

from __future__ import annotations

from typing import Callable, Dict

import torch

from tgtfast import _ext
from tgtfast.dispatch import Backend, register_op
from tgtfast.ops._autodiff import check_no_double_backward
from tgtfast.ops.ptloss import row_factor

OP = "sparse_coarse"
FWD: Dict[str, Callable] = {}  # backend name -> sparse_coarse_fwd(student, indices, valid, scale) -> coarse
BWD: Dict[str, Callable] = {}  # backend name -> sparse_coarse_bwd(student, indices, coarse, grad, valid, scale)


def _fake_fwd(student, indices, valid, scale):
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    return student.new_empty((student.shape[0], indices.shape[1] + 1), dtype=acc)


def _fake_bwd(student, indices, coarse, grad_coarse, valid, scale):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def _autograd(bwd: Callable):
    def setup_context(ctx, inputs, output):
        student, indices, valid, scale = inputs
        ctx.scale = float(scale)
        ctx.save_for_backward(student, indices, output, valid)
        ctx.set_materialize_grads(False)

    def backward(ctx, grad):
        if grad is None:
            return None, None, None, None
        check_no_double_backward("the sparse teacher's coarse student logits")
        student, indices, coarse, valid = ctx.saved_tensors
        return bwd(student, indices, coarse, grad.contiguous(), valid, ctx.scale), None, None, None

    return backward, setup_context


def _register(fwd_name: str, bwd_name: str, backends, fake: bool) -> None:
    if fake:
        torch.library.register_fake(fwd_name)(_fake_fwd)
        torch.library.register_fake(bwd_name)(_fake_bwd)
    bwd = getattr(torch.ops.tgtfast, bwd_name.split("::")[1]).default
    backward, setup_context = _autograd(bwd)
    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)
    for b in backends:
        FWD[b] = getattr(torch.ops.tgtfast, fwd_name.split("::")[1]).default
        BWD[b] = bwd


def _load_triton() -> None:
    if "triton" in FWD:
        return
    from tgtfast.kernels import sparse as kernels

    torch.library.triton_op("tgtfast::sparse_coarse_fwd_triton", kernels.sparse_coarse_fwd, mutates_args=())
    torch.library.triton_op("tgtfast::sparse_coarse_bwd_triton", kernels.sparse_coarse_bwd, mutates_args=())
    _register("tgtfast::sparse_coarse_fwd_triton", "tgtfast::sparse_coarse_bwd_triton", ("triton",), fake=False)


def _has_kernel(name: str, key: str) -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"tgtfast::{name}", key))
    except RuntimeError:  # the schema is not declared (an extension built before this op existed)
        return False


FUSED: Dict[str, Callable] = {}  # backend name -> sparse_divergence_fwd (CPU only)


def _fake_fused(student, indices, teacher, valid, tail, slack, divergence, param_a, param_b, scale, teacher_scale,
                need_grad, grad_scale=1.0):
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    grad = torch.empty_like(student, memory_format=torch.contiguous_format) if need_grad else student.new_empty((0,))
    return (student.new_empty((student.shape[0],), dtype=acc), grad,
            student.new_empty((student.shape[0],), dtype=torch.int8))


def _fused_setup_context(ctx, inputs, output):
    ctx.grad_scale = float(inputs[12]) if len(inputs) > 12 else 1.0
    ctx.save_for_backward(output[1])
    ctx.set_materialize_grads(False)


def _fused_backward(ctx, g_loss, _g_grad, _g_status):
    if g_loss is None:
        return (None,) * 13
    check_no_double_backward("tgtfast.distill_loss from a sparse teacher")
    (grad,) = ctx.saved_tensors
    factor = row_factor(g_loss, ctx.grad_scale)
    return (grad if factor is None else grad * factor.to(grad.dtype),) + (None,) * 12


_missing: Dict[Backend, str] = {}
if _ext.ext is not None and _has_kernel("sparse_divergence_fwd", "CPU"):
    torch.library.register_fake("tgtfast::sparse_divergence_fwd")(_fake_fused)
    torch.library.register_autograd("tgtfast::sparse_divergence_fwd", _fused_backward,
                                    setup_context=_fused_setup_context)
    FUSED["cpp"] = torch.ops.tgtfast.sparse_divergence_fwd.default
if _ext.ext is not None and _has_kernel("sparse_coarse_fwd", "CPU") and _has_kernel("sparse_coarse_bwd", "CPU"):
    cuda = _has_kernel("sparse_coarse_fwd", "CUDA")
    _register("tgtfast::sparse_coarse_fwd", "tgtfast::sparse_coarse_bwd", ("cpp", "cuda") if cuda else ("cpp",),
              fake=True)
    if not cuda:
        _missing[Backend.CUDA] = "the extension has no CUDA kernel for sparse_coarse_fwd"
else:
    _missing[Backend.CPP] = _missing[Backend.CUDA] = "the compiled extension has no sparse_coarse kernels (rebuild it)"

register_op(OP, missing=_missing, dtypes={Backend.CUDA: (torch.float32, torch.float16, torch.bfloat16)},
            loaders={Backend.TRITON: _load_triton})


TOPK_OP = "sparse_topk"
TOPK: Dict[str, Callable] = {}  # backend name -> sparse_topk(logits, rows, k, temperature) -> (values, indices)
if _ext.ext is not None and _has_kernel("sparse_topk", "CPU"):
    TOPK["cpp"] = torch.ops.tgtfast.sparse_topk.default

    @torch.library.register_fake("tgtfast::sparse_topk")
    def _fake_topk(logits, rows, k, temperature):
        n = logits.shape[0] if rows is None else rows.shape[0]
        return (logits.new_empty((n, k), dtype=torch.float32), logits.new_empty((n, k), dtype=torch.int64))

    _topk_missing = {Backend.CUDA: "torch.topk serves GPU tensors", Backend.TRITON: "torch.topk serves GPU tensors"}
else:
    _topk_missing = {b: "the compiled extension has no sparse_topk kernel (rebuild it)"
                     for b in (Backend.CPP, Backend.CUDA, Backend.TRITON)}
register_op(TOPK_OP, missing=_topk_missing, dtypes={Backend.CPP: (torch.float32, torch.float64, torch.float16,
                                                                   torch.bfloat16)})


def fused(backend: Backend):
    """The one-pass ``sparse_divergence_fwd`` of `backend`, or None where the loss runs as ``sparse_coarse`` then
    ``divergence``."""
    return FUSED.get(Backend(backend).value)


def coarse(backend: Backend) -> Callable:
    """The ``sparse_coarse_fwd`` implementation of `backend` (differentiable through its registered autograd)."""
    return FWD[Backend(backend).value]
