"""Eager PyTorch references: the specification every backend is tested against.

Each function here is short, written with plain differentiable torch ops, and works in any floating
dtype. Where it judges a backend (the tests, ``tgtfast bench``'s match column) it runs in float64: in float32 it
is itself less accurate than the fused kernels at low temperatures. No input validation: the public API
validates before dispatch. This module imports nothing of the package; the math is in docs/design.md.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "ptloss_rows",
    "ptloss",
    "reduce_rows",
    "mask_rows",
    "philox4x32_10",
    "latent_noise",
    "perturb",
    "temperature_softmax",
    "perturb_decode_label",
    "ACTIVATIONS",
    "mlp_forward",
    "perturb_decode_label_mlp",
    "fused_linear_ptloss",
    "DIVERGENCES",
    "divergence_rows",
    "distill_loss",
    "fused_linear_distill_loss",
    "coarse_logits",
    "sparse_teacher_logprobs",
    "sparse_divergence_rows",
    "slam_loss",
]


def ptloss_rows(
    student_logits: torch.Tensor,
    teacher: torch.Tensor,
    coeffs: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    teacher_is_logits: bool = True,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-row PTLoss ``[..., K] -> [...]`` (docs/design.md, "PTLoss").

    ``L = sum_j p_j (log p_j - log q_j) + sum_j p_j sum_m eta[m, j] (1 - q_j)^m`` with
    ``q = softmax(s / T)``, ``p = softmax(t / T)`` (or ``t`` itself), optionally smoothed
    ``p <- (1 - delta) p + delta / K``. ``coeffs`` is ``[M]`` or ``[M, K]``; ``None`` or ``M = 0`` is KL.
    """
    k = student_logits.shape[-1]
    log_q = torch.log_softmax(student_logits / temperature, dim=-1)
    if teacher_is_logits:  # log p from log_softmax keeps p log p differentiable where p underflows to 0
        log_p = torch.log_softmax(teacher / temperature, dim=-1)
        p = log_p.exp()
    else:
        p, log_p = teacher, None
    if label_smoothing > 0:
        p = (1.0 - label_smoothing) * p + label_smoothing / k
        log_p = torch.log(p)
    # Classes the teacher gives no mass add nothing (0 log 0 = 0), whatever the student's logit there: a teacher
    # logit of -inf, or a -inf student logit where the teacher is 0, is an absent class, not a NaN.
    has = p > 0
    zero = torch.zeros((), dtype=log_q.dtype, device=log_q.device)
    log_q_has = torch.where(has, log_q, zero)
    if log_p is not None:
        loss = torch.where(has, p * (torch.where(has, log_p, zero) - log_q_has), zero)
    else:
        loss = torch.xlogy(p, p) - torch.where(has, p * log_q_has, zero)
    if coeffs is not None and coeffs.numel() > 0:
        eta = coeffs.to(log_q.dtype)
        if eta.dim() == 1:
            eta = eta[:, None].expand(-1, k)
        one_minus_q = -torch.expm1(log_q)
        powers = torch.stack([one_minus_q**m for m in range(1, eta.shape[0] + 1)])  # [M, ..., K]
        eta = eta.reshape(eta.shape[0], *([1] * (log_q.dim() - 1)), k)
        loss = loss + p * (eta * powers).sum(0)
    return loss.sum(-1)


def mask_rows(student_logits, teacher, valid, teacher_is_logits):
    """Replace ignored rows by a harmless constant so that NaN/inf there cannot reach the gradient."""
    zero = torch.zeros((), dtype=student_logits.dtype, device=student_logits.device)
    fill = zero if teacher_is_logits else torch.full_like(zero, 1.0 / teacher.shape[-1], dtype=teacher.dtype)
    keep = valid.unsqueeze(-1)
    return torch.where(keep, student_logits, zero), torch.where(keep, teacher, fill)


def reduce_rows(rows: torch.Tensor, valid: Optional[torch.Tensor], reduction: str) -> torch.Tensor:
    """Reduce per-row losses: ``none`` keeps the row shape (ignored rows are 0); ``sum`` adds the rows;
    ``mean`` and ``batchmean`` divide the sum by the number of rows that are not ignored (0 if none)."""
    if valid is not None:
        rows = torch.where(valid, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    count = rows.numel() if valid is None else valid.sum()
    return total / torch.clamp(torch.as_tensor(count, device=rows.device), min=1).to(rows.dtype)


def ptloss(
    student_logits: torch.Tensor,
    teacher: torch.Tensor,
    coeffs: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    teacher_is_logits: bool = True,
    label_smoothing: float = 0.0,
    reduction: str = "batchmean",
    ignore_index: int = -100,
    target: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reference of :func:`tgtfast.ptloss` (same arguments and conventions, no ``backend``)."""
    valid = None if target is None else target != ignore_index
    if valid is not None:
        student_logits, teacher = mask_rows(student_logits, teacher, valid, teacher_is_logits)
    rows = ptloss_rows(
        student_logits,
        teacher,
        coeffs,
        temperature=temperature,
        teacher_is_logits=teacher_is_logits,
        label_smoothing=label_smoothing,
    )
    return reduce_rows(rows, valid, reduction)


def fused_linear_ptloss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    coeffs: Optional[torch.Tensor] = None,
    *,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    target: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
) -> torch.Tensor:
    """Reference of :func:`tgtfast.fused_linear_ptloss`: materialise both logits, then
    ``kd_weight * ptloss(s, t) + ce_weight * cross_entropy(s, target)`` (cross-entropy at temperature 1, both
    reduced alike). The teacher is detached. Logits are computed in the dtype of the inputs."""
    s = F.linear(student_hidden, student_weight, student_bias)
    with torch.no_grad():
        t = F.linear(teacher_hidden, teacher_weight, teacher_bias)
    loss = kd_weight * ptloss(s, t, coeffs, temperature=temperature, reduction=reduction,
                              ignore_index=ignore_index, target=target)
    if ce_weight != 0:
        valid = target != ignore_index
        rows = F.cross_entropy(s.flatten(0, -2), torch.where(valid, target, 0).flatten(), reduction="none")
        loss = loss + ce_weight * reduce_rows(rows.reshape(valid.shape), valid, reduction)
    return loss


# The divergences of tgtfast.distill_loss; their order is the kernels' code (divergence_fwd's `divergence`).
DIVERGENCES = (
    "forward_kl",
    "reverse_kl",
    "jsd",
    "skew_kl",
    "skew_reverse_kl",
    "tvd",
    "symmetric_kl",
    "ab_divergence",
    "taid",
)


def _xlog(x: torch.Tensor, log_x: torch.Tensor, log_y: torch.Tensor) -> torch.Tensor:
    """``x (log x - log y)`` elementwise, 0 where ``x = 0`` whatever ``y`` (0 log 0 = 0), with finite gradients there."""
    has = x != 0  # NaN stays NaN (the row's loss must show it)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    return torch.where(has, x * torch.where(has, log_x - log_y, zero), zero)


def _log_mix(w: float, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``log(w a + (1 - w) b)`` from log a and log b, for w in [0, 1]."""
    la = math.log(w) if w > 0 else -math.inf
    lb = math.log1p(-w) if w < 1 else -math.inf
    return torch.logaddexp(log_a + la, log_b + lb)


def divergence_rows(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: str = "forward_kl",
    *,
    param_a: float = 0.0,
    param_b: float = 0.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-row divergence ``[..., K] -> [...]`` between ``p = softmax(teacher / T)`` and ``q = softmax(student / T)``
    (docs/design.md, "Divergences"). ``param_a``/``param_b`` are the divergence's parameters in the kernels' order:
    jsd: beta; skew_kl, skew_reverse_kl: alpha; symmetric_kl: lam; ab_divergence: alpha, beta; taid: t."""
    a, b = float(param_a), float(param_b)
    lq = torch.log_softmax(student_logits / temperature, dim=-1)
    if divergence == "taid":  # the target interpolates from the (detached) student to the teacher
        u_s, u_t = (student_logits / temperature).detach(), teacher_logits / temperature
        mixed = u_t if a == 1.0 else u_s if a == 0.0 else (1.0 - a) * u_s + a * u_t  # no 0 * (-inf)
        lp = torch.log_softmax(mixed, dim=-1)
    else:
        lp = torch.log_softmax(teacher_logits / temperature, dim=-1)
    p, q = lp.exp(), lq.exp()
    if divergence in ("forward_kl", "taid") or (divergence == "jsd" and a == 0.0):
        terms = _xlog(p, lp, lq)
    elif divergence == "reverse_kl" or (divergence == "jsd" and a == 1.0):
        terms = _xlog(q, lq, lp)
    elif divergence == "jsd":
        lm = _log_mix(a, lp, lq)
        terms = a * _xlog(p, lp, lm) + (1.0 - a) * _xlog(q, lq, lm)
    elif divergence == "skew_kl":
        terms = _xlog(p, lp, _log_mix(a, lp, lq))
    elif divergence == "skew_reverse_kl":
        terms = _xlog(q, lq, _log_mix(1.0 - a, lp, lq))
    elif divergence == "tvd":
        terms = 0.5 * (p - q).abs()
    elif divergence == "symmetric_kl":  # the endpoints alone: no 0 * inf where one side has -inf logits
        forward, reverse = _xlog(p, lp, lq), _xlog(q, lq, lp)
        terms = forward if a == 0.0 else reverse if a == 1.0 else (1.0 - a) * forward + a * reverse
    elif divergence == "ab_divergence":
        terms = _ab_terms(a, b, lp, lq)
    else:
        raise ValueError(f"unknown divergence {divergence!r}; expected one of {DIVERGENCES}")
    return terms.sum(-1)


def _ab_terms(alpha: float, beta: float, lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """Cichocki's alpha-beta divergence elementwise, with its limit forms where alpha, beta or alpha + beta is 0."""
    if alpha != 0 and beta != 0 and alpha + beta != 0:
        s = alpha + beta
        return -(torch.exp(alpha * lp + beta * lq) - alpha / s * torch.exp(s * lp) - beta / s * torch.exp(s * lq)) / (
            alpha * beta
        )
    if alpha != 0 and beta == 0:
        pa = torch.exp(alpha * lp)
        return (alpha * _xlog(pa, lp, lq) - pa + torch.exp(alpha * lq)) / alpha**2
    if alpha == 0 and beta != 0:
        qb = torch.exp(beta * lq)
        return (beta * _xlog(qb, lq, lp) - qb + torch.exp(beta * lp)) / beta**2
    if alpha != 0:  # alpha = -beta
        return (alpha * (lq - lp) + torch.exp(alpha * (lp - lq)) - 1.0) / alpha**2
    return 0.5 * (lp - lq) ** 2


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: str = "forward_kl",
    *,
    param_a: float = 0.0,
    param_b: float = 0.0,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    ignore_index: int = -100,
    target: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reference of :func:`tgtfast.distill_loss` with the parameters in the kernels' order (see
    :func:`divergence_rows`); ignored rows are left out, reductions as :func:`reduce_rows`; ``weight`` (the
    leading shape) multiplies each row's divergence before the reduction."""
    valid = None if target is None else target != ignore_index
    if valid is not None:
        student_logits, teacher_logits = mask_rows(student_logits, teacher_logits, valid, True)
    rows = divergence_rows(
        student_logits, teacher_logits, divergence, param_a=param_a, param_b=param_b, temperature=temperature
    )
    if weight is not None:
        rows = rows * weight.reshape(rows.shape)
    return reduce_rows(rows, valid, reduction)


def fused_linear_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    divergence: str = "forward_kl",
    *,
    param_a: float = 0.0,
    param_b: float = 0.0,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    target: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
) -> torch.Tensor:
    """Reference of :func:`tgtfast.fused_linear_distill_loss`: materialise both logits, then
    ``kd_weight * distill_loss(s, t) + ce_weight * cross_entropy(s, target)`` (teacher detached)."""
    s = F.linear(student_hidden, student_weight, student_bias)
    with torch.no_grad():
        t = F.linear(teacher_hidden, teacher_weight, teacher_bias)
    loss = kd_weight * distill_loss(s, t, divergence, param_a=param_a, param_b=param_b, temperature=temperature,
                                    reduction=reduction, ignore_index=ignore_index, target=target)
    if ce_weight != 0:
        valid = target != ignore_index
        rows = F.cross_entropy(s.flatten(0, -2), torch.where(valid, target, 0).flatten(), reduction="none")
        loss = loss + ce_weight * reduce_rows(rows.reshape(valid.shape), valid, reduction)
    return loss


def coarse_logits(student_logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``[..., V]``, ``[..., k]`` -> ``[..., k + 1]``: the logits at `indices`, then the log-sum-exp of all the
    others (the tail bucket; ``-inf`` when there is none). ``softmax`` of the result is the student's distribution
    coarse-grained to the teacher's kept classes and one tail (docs/design.md, "Sparse teachers")."""
    top = student_logits.gather(-1, indices)
    rest = student_logits.scatter(-1, indices, -math.inf)
    return torch.cat([top, torch.logsumexp(rest, -1, keepdim=True)], -1)


def sparse_teacher_logprobs(logprobs: torch.Tensor, tail: str = "bucket", temperature: float = 1.0) -> torch.Tensor:
    """``[..., k]`` cached log-probabilities (temperature 1) -> ``[..., k + 1]`` coarse teacher log-probabilities:
    ``log_softmax([logprobs, log(1 - sum exp(logprobs))] / T)`` with ``tail="bucket"``, the tail entry ``-inf``
    (no mass outside the kept classes) with ``tail="renormalize"``."""
    if tail == "bucket":
        mass = torch.logsumexp(logprobs, -1, keepdim=True).clamp(max=0.0)
        log_tail = torch.log(-torch.expm1(mass))  # log(1 - kept mass); -inf when the kept classes hold it all
    else:
        log_tail = torch.full_like(logprobs[..., :1], -math.inf)
    return torch.log_softmax(torch.cat([logprobs, log_tail], -1) / temperature, -1)


def topk_logprobs(logits: torch.Tensor, k: int, temperature: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """The teacher cache's reduction: ``topk(log_softmax(logits.float() / T), k)`` per row, as (float32
    log-probabilities most probable first, int64 class ids)."""
    values, indices = torch.topk(torch.log_softmax(logits.float() / temperature, -1), k, -1)
    return values, indices


def sparse_divergence_rows(
    student_logits: torch.Tensor,
    indices: torch.Tensor,
    teacher_coarse: torch.Tensor,
    divergence: str = "forward_kl",
    *,
    param_a: float = 0.0,
    param_b: float = 0.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-row divergence between a sparse teacher (coarse log-probabilities ``[..., k + 1]`` from
    :func:`sparse_teacher_logprobs`) and the dense student, on the teacher's kept classes plus one tail bucket."""
    w = coarse_logits(student_logits / temperature, indices)
    return divergence_rows(w, teacher_coarse, divergence, param_a=param_a, param_b=param_b)


def kl_div_batchmean(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float = 1.0):
    """Plain KD as torch writes it: ``kl_div(log_softmax(s / T), p, reduction="batchmean")``."""
    return F.kl_div(torch.log_softmax(student_logits / temperature, -1), teacher_probs, reduction="batchmean")


_MASK32 = 0xFFFFFFFF


def _mulhilo(a: torch.Tensor, m: int):
    """(hi, lo) 32-bit words of a * m for uint32 values held in int64, without 64-bit overflow."""
    p_lo, p_hi = a * (m & 0xFFFF), a * (m >> 16)  # each < 2^48
    lo = (p_lo + ((p_hi & 0xFFFF) << 16)) & _MASK32
    hi = (p_hi + (p_lo >> 16)) >> 16
    return hi, lo


def philox4x32_10(counter: torch.Tensor, key: tuple) -> torch.Tensor:
    """Philox4x32-10 of uint32 words held in int64: ``counter [..., 4]``, ``key = (k0, k1)`` -> ``[..., 4]``."""
    x0, x1, x2, x3 = counter.unbind(-1)
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo(x0, 0xD2511F53)
        hi1, lo1 = _mulhilo(x2, 0xCD9E8D57)
        x0, x1, x2, x3 = hi1 ^ x1 ^ k0, lo1, hi0 ^ x3 ^ k1, lo0
        k0, k1 = (k0 + 0x9E3779B9) & _MASK32, (k1 + 0xBB67AE85) & _MASK32
    return torch.stack([x0, x1, x2, x3], -1)


def latent_noise(shape, seed: int, offset: int = 0, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise of the counter-based generator all backends share (csrc/philox.h).

    Element ``i`` (row-major) uses stream index ``j = offset + i``: the Philox4x32-10 words of the group
    ``j // 4`` under the key ``seed``, a pair of them through Box-Muller, cos for even ``j`` and sin for odd.
    """
    numel = 1
    for s in shape:
        numel *= int(s)
    j = torch.arange(numel, dtype=torch.int64) + int(offset)
    g = j >> 2
    zero = torch.zeros_like(g)
    words = philox4x32_10(torch.stack([g & _MASK32, g >> 32, zero, zero], -1), (seed & _MASK32, seed >> 32))
    second = ((j & 3) >= 2).unsqueeze(-1)
    a = torch.where(second, words[:, 2:3], words[:, 0:1]).squeeze(-1)
    b = torch.where(second, words[:, 3:4], words[:, 1:2]).squeeze(-1)
    u1 = ((a >> 8).to(torch.float32) + 0.5) * 2.0**-24
    u2 = ((b >> 8).to(torch.float32) + 0.5) * 2.0**-24
    radius = torch.sqrt(-2.0 * torch.log(u1))
    theta = 6.283185307179586 * u2
    n = radius * torch.where((j & 1) == 1, torch.sin(theta), torch.cos(theta))
    return n.reshape(tuple(shape)).to(device=device, dtype=dtype)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def perturb(z: torch.Tensor, sigma: float, seed: int, offset: int = 0) -> torch.Tensor:
    """``z + sigma * latent_noise(z.shape, seed, offset)``, summed in float32 (float64 for float64 ``z``)."""
    acc = _acc_dtype(z.dtype)
    noise = latent_noise(z.shape, seed, offset, device=z.device, dtype=acc)
    return (z.to(acc) + sigma * noise).to(z.dtype)


def temperature_softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``softmax(logits / temperature)`` over the last dimension, computed in float32 (float64 for float64)."""
    return torch.softmax(logits.to(_acc_dtype(logits.dtype)) / temperature, dim=-1).to(logits.dtype)


def perturb_decode_label(z, decoder, labeler, *, sigma: float, seed: int, offset: int = 0, temperature: float = 1.0):
    """TGT random exploration (docs/design.md, "TGT step"): ``x_new = decoder(z + sigma * noise)`` and
    ``soft_labels = softmax(labeler(x_new) / temperature)``, with the noise of :func:`latent_noise`."""
    x_new = decoder(perturb(z, sigma, seed, offset))
    return x_new, temperature_softmax(labeler(x_new), temperature)


# The one activation table: name -> function. Its order gives the code every kernel knows an activation by
# (identity 0, relu 1, gelu 2, gelu_tanh 3, silu 4, tanh 5, sigmoid 6: csrc/mlp_chain/, kernels/mlp_chain.py).
ACTIVATIONS = {
    "identity": lambda x: x,
    "relu": torch.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}
_MLP_ACTIVATIONS = ACTIVATIONS


def mlp_forward(x: torch.Tensor, layers) -> torch.Tensor:
    """An MLP given as ``[(weight [out, in], bias or None, activation name), ...]``, computed in x's dtype."""
    for w, b, act in layers:
        x = ACTIVATIONS[act](F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype)))
    return x


def perturb_decode_label_mlp(z, dec_layers, lab_layers, *, sigma: float, seed: int, offset: int = 0,
                             temperature: float = 1.0):
    """``x = dec(z + sigma * latent_noise(z.shape, seed, offset))``, ``softmax(lab(x) / temperature)``.

    Computed in float32 (float64 for a float64 ``z``) and returned in z's dtype."""
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    noise = latent_noise(z.shape, seed, offset, device=z.device, dtype=acc)
    x = mlp_forward(z.to(acc) + sigma * noise, dec_layers)
    soft = torch.softmax(mlp_forward(x, lab_layers) / temperature, dim=-1)
    return x.to(z.dtype), soft.to(z.dtype)


def slam_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha, k, *, temperature: float = 1.0,
              normalize: bool = True, reduction: str = "mean") -> torch.Tensor:
    """Reference of :func:`tgtfast.imperfect.slam_loss` on ``[N, V]``: ``f = softmax(s / T)``,
    ``y = softmax(t / T)``, ``mix = alpha f + (1 - alpha) (1 - f) top(y; k) / (k - 1)`` (no ``/ (k - 1)`` unless
    ``normalize``), rows ``-sum_j y_j log mix_j``; ``alpha`` and ``k`` numbers or ``[N]``. Outside the top-k,
    ``log mix = log(max(alpha, tiny)) + log f`` (finite at ``alpha = 0``, as the implementation defines it)."""
    log_f = torch.log_softmax(student_logits / temperature, dim=-1)
    f = log_f.exp()
    y = torch.softmax(teacher_logits.detach() / temperature, dim=-1)
    n = f.shape[0]
    alpha = torch.as_tensor(alpha, dtype=f.dtype).reshape(-1, 1).expand(n, 1)
    k = torch.as_tensor(k).reshape(-1, 1).expand(n, 1)
    rank = torch.argsort(torch.argsort(y, dim=-1, descending=True), dim=-1)  # 0 = the teacher's top class
    c = (1 - alpha) / (k - 1).to(f.dtype) if normalize else 1 - alpha
    log_mix = torch.where(rank < k, torch.log(alpha * f + c * (1 - f)),
                          torch.log(alpha.clamp_min(torch.finfo(f.dtype).tiny)) + log_f)
    return reduce_rows(-(y * log_mix).sum(-1), None, reduction)
