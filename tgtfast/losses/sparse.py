"""Distilling from a sparse (top-k) teacher: :class:`SparseTeacher`, and the divergence between it and a dense student
(docs/design.md, "Sparse teachers").

A cached teacher keeps, per token, its ``k`` most probable classes and their log-probabilities at temperature 1, and
either the mass of all other classes as one tail bucket (``tail="bucket"``) or nothing (``tail="renormalize"``: the
kept classes are renormalised). The student's dense distribution is coarse-grained to the same ``k + 1`` classes (the
``sparse_coarse`` op, one pass over ``[N, V]``), and the divergence runs between the two coarse distributions on the
``divergence`` op. For every f-divergence of the menu (forward and reverse KL, JSD, skew KL, TVD, symmetric KL) and
TAID this is exactly the divergence against the dense teacher whose tail mass is spread over the tail classes in
proportion to the student's own; the AB-divergence is an f-divergence only when ``alpha + beta = 1`` and is refused
otherwise.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from tgtfast import reference
from tgtfast import validation as V

__all__ = ["SparseTeacher"]

TAILS = ("bucket", "renormalize")
# Kept log-probabilities may exceed 0 and their mass 1 by float rounding of the cache's dtype, not by more.
_LOGPROB_SLACK = {torch.float64: 1e-9, torch.float32: 1e-5}
# The verdicts of the CPU kernel's row checks (csrc/ops.cpp, sparse_divergence_fwd), by status code.
_STATUS = {1: "an index outside [0, {v})", 2: "an index repeated within the row", 3: "a NaN log-probability",
           4: "a log-probability above 0", 5: "kept probabilities summing to more than 1"}


class SparseTeacher:
    """A teacher known by its top-k classes per token: ``SparseTeacher(indices, logprobs, tail="bucket")``.

    Args:
        indices: ``[..., k]`` integer tensor (int32 or int64) of class ids, distinct within a row.
        logprobs: ``[..., k]`` floating tensor, the teacher's log-probabilities (temperature 1) of those classes:
            ``<= 0`` and summing (as probabilities) to at most 1 per row.
        tail: ``"bucket"`` (default): the mass ``1 - sum exp(logprobs)`` of every other class is kept as one tail
            class; ``"renormalize"``: the kept classes are renormalised and the others get no probability.
        temperature: the temperature the log-probabilities were taken at (default 1). A loss at temperature ``T``
            tempers them by ``T / temperature``: cache at the temperature you distil with, so that the teacher is
            used as cached (see below).

    Accepted by :func:`tgtfast.distill_loss` and :func:`tgtfast.fused_linear_distill_loss` in place of teacher
    logits. A loss temperature ``T`` is applied to the teacher as ``log_softmax([logprobs, log tail] * temperature /
    T)`` over the kept classes and the tail bucket (without the tail for ``"renormalize"``). Tempering the bucket is
    not tempering the classes in it: with ``T`` different from the cache's temperature the teacher's tail mass is
    badly misjudged (benchmarks/README.md, "Sparse (top-k) teachers": at ``T = 2`` from a temperature-1 cache the loss
    was 20-690% off); cache at the temperature you train with.

    Rows whose ``target`` is ``ignore_index`` are not checked (padding may hold anything).
    """

    def __init__(self, indices: torch.Tensor, logprobs: torch.Tensor, *, tail: str = "bucket",
                 temperature: float = 1.0) -> None:
        V.tensor("indices", indices)
        V.tensor("logprobs", logprobs, floating=True)
        if indices.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"indices must be an int32 or int64 tensor, got {indices.dtype}")
        if indices.dim() < 1 or indices.shape != logprobs.shape:
            raise ValueError(f"indices {tuple(indices.shape)} and logprobs {tuple(logprobs.shape)} must have the same "
                             "shape [..., k]")
        if indices.shape[-1] == 0:
            raise ValueError("a sparse teacher needs k >= 1 classes per row, got k = 0")
        V.same_device("logprobs", logprobs, "indices", indices.device)
        self.indices = indices
        self.logprobs = logprobs
        self.tail = V.choice("tail", tail, TAILS)
        self.temperature = V.temperature(temperature)

    @property
    def k(self) -> int:
        return self.indices.shape[-1]

    @property
    def shape(self) -> torch.Size:
        """The leading shape (one row per token)."""
        return self.indices.shape[:-1]

    @property
    def device(self) -> torch.device:
        return self.indices.device

    def to(self, device) -> "SparseTeacher":
        return SparseTeacher(self.indices.to(device), self.logprobs.to(device), tail=self.tail,
                             temperature=self.temperature)

    def rows(self, start: int, end: int) -> "SparseTeacher":
        """Rows ``[start, end)`` of the flattened teacher."""
        return SparseTeacher(self.indices.reshape(-1, self.k)[start:end], self.logprobs.reshape(-1, self.k)[start:end],
                             tail=self.tail, temperature=self.temperature)

    def __repr__(self) -> str:
        return (f"SparseTeacher(shape={tuple(self.shape)}, k={self.k}, tail={self.tail!r}, "
                f"temperature={self.temperature:g})")

    def check(self, vocab_size: int, valid: Optional[torch.Tensor] = None) -> None:
        """Raise a ValueError naming the first bad row: an index outside ``[0, vocab_size)`` or repeated within a row,
        a NaN or positive log-probability, a row whose kept mass exceeds 1, or ``k > vocab_size``. Skipped while
        compiling. `valid` ([rows] bool) leaves ignored rows out."""
        self.check_k(vocab_size)
        if V.is_compiling():
            return
        idx = self.indices.reshape(-1, self.k)
        lp = self.logprobs.reshape(-1, self.k)
        rows = torch.ones(idx.shape[0], dtype=torch.bool, device=idx.device) if valid is None else valid.reshape(-1)
        slack = self.slack()

        def first(bad: torch.Tensor, what: str) -> None:
            bad = bad & rows
            if bool(bad.any()):
                row = int(bad.nonzero()[0, 0])
                raise ValueError(f"sparse teacher row {row}: {what}")

        first(((idx < 0) | (idx >= vocab_size)).any(-1), _STATUS[1].format(v=vocab_size))
        if self.k > 1:
            ordered = (idx.int() if vocab_size < 2**31 else idx).sort(-1).values
            first((ordered[:, 1:] == ordered[:, :-1]).any(-1), _STATUS[2])
        lp_bad = ~(lp <= slack).all(-1)  # NaN or above 0 (one pass; told apart only to word the error)
        if bool((lp_bad & rows).any()):
            first(torch.isnan(lp).any(-1), _STATUS[3])
            first(lp_bad, _STATUS[4])
        if self.tail == "bucket":
            mass = torch.logsumexp(lp.float(), -1)
            first(mass > math.log1p(max(slack, 1e-5) * self.k), _STATUS[5])

    def check_k(self, vocab_size: int) -> None:
        """Raise a ValueError when the teacher keeps more classes than the student has."""
        if self.k > vocab_size:
            raise ValueError(f"the sparse teacher keeps k = {self.k} classes but the student has V = {vocab_size}")

    def has_tail(self, vocab_size: Optional[int]) -> bool:
        """Whether the coarse distribution has a tail class: ``tail="bucket"`` and a class left outside the top k
        (with ``k = V`` none is, whatever mass float rounding leaves the bucket)."""
        return self.tail == "bucket" and (vocab_size is None or self.k < vocab_size)

    def slack(self) -> float:
        """How far above 0 a kept log-probability may be (and its mass above 1, per kept class): float rounding."""
        return _LOGPROB_SLACK.get(self.logprobs.dtype, 1e-2)

    def coarse_logprobs(self, temperature: float = 1.0, dtype: torch.dtype = torch.float32,
                        vocab_size: Optional[int] = None) -> torch.Tensor:
        """``[rows, k + 1]`` coarse teacher log-probabilities at `temperature` (the tail last; ``-inf`` for
        ``"renormalize"``), computed in float64 and returned in `dtype`."""
        lp = self.logprobs.reshape(-1, self.k).double().clamp(max=0.0)
        tail = "bucket" if self.has_tail(vocab_size) else "renormalize"
        return reference.sparse_teacher_logprobs(lp, tail, temperature / self.temperature).to(dtype)

    def flat_indices(self) -> torch.Tensor:
        return self.indices.reshape(-1, self.k).to(torch.int64).contiguous()


def check_divergence(name: str, param_a: float, param_b: float, tail: str) -> None:
    """Refuse the combinations a sparse teacher does not define: the AB-divergence unless alpha + beta = 1 (only
    then an f-divergence, for which the tail bucket is exact), and, with ``tail="renormalize"``, the divergences
    that are +inf wherever the teacher has no mass and the student has some."""
    if name == "ab_divergence" and param_a + param_b != 1.0:
        raise ValueError(
            "ab_divergence from a sparse teacher needs alpha + beta = 1 (then it is an f-divergence and the tail "
            f"bucket is exact); got alpha + beta = {param_a + param_b}")
    if tail == "renormalize":
        infinite = (name == "reverse_kl" or (name == "symmetric_kl" and param_a > 0)
                    or (name == "skew_reverse_kl" and param_a == 0.0)
                    or (name == "ab_divergence" and param_a < 0))
        if infinite:
            raise ValueError(
                f"{name} compares the teacher's probability of every class the student gives mass to; with "
                "tail='renormalize' the teacher gives the classes outside its top k none and the loss is +inf: "
                "use tail='bucket'")


def sparse_rows(student: torch.Tensor, teacher: SparseTeacher, div, a_s: float, temperature: float,
                valid: Optional[torch.Tensor], backend: Optional[str], who: str, check: bool = True,
                grad_scale: float = 1.0) -> torch.Tensor:
    """Per-row divergence between the dense student rows ``student`` ``[N, V]`` (logits; ``a_s`` = logit scale /
    T) and the sparse teacher, on the backend the dispatcher picks; differentiable wrt ``student``. ``check=False``:
    the caller has checked the teacher's rows and the divergence already (once for all its chunks). `grad_scale`:
    the weight the caller's reduction gives each row, so that the CPU kernel's stored gradient needs no rescaling
    (any value is correct; a matching one saves a pass over ``[N, V]``)."""
    from tgtfast.dispatch import Backend, select
    from tgtfast.ops import divergence as _div_op
    from tgtfast.ops import sparse as _sparse_op
    from tgtfast.ops._autodiff import check_no_tangent

    n, v = student.shape
    if teacher.shape.numel() != n:
        raise ValueError(f"the sparse teacher has leading shape {tuple(teacher.shape)} ({teacher.shape.numel()} rows) "
                         f"but the student has {n} rows")
    if teacher.device != student.device:
        raise ValueError(f"the sparse teacher is on {teacher.device} but the student is on {student.device}")
    chosen = select(backend, student.device, student.dtype, op="sparse_coarse")
    one_pass = None if chosen is Backend.REFERENCE else _sparse_op.fused(chosen)
    if check:
        teacher.check_k(v)
        if one_pass is None:  # the one-pass kernel checks the rows itself
            teacher.check(v, valid)
        check_divergence(div.name, div.param_a, div.param_b, teacher.tail)
    idx = teacher.flat_indices()
    if one_pass is not None:
        check_no_tangent(who, student)
        grad_on = torch.is_grad_enabled() and student.requires_grad
        rows, _, status = one_pass(student.contiguous(), idx, teacher.logprobs.reshape(-1, teacher.k).double(),
                                   None if valid is None else valid.contiguous(), teacher.has_tail(v),
                                   teacher.slack(), div.code, div.param_a, div.param_b, a_s,
                                   teacher.temperature / temperature, grad_on, grad_scale)
        if check and not V.is_compiling() and bool(status.any()):
            row = int(status.nonzero()[0, 0])
            raise ValueError(f"sparse teacher row {row}: {_STATUS[int(status[row])].format(v=v)}")
        return rows
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    lp_t = teacher.coarse_logprobs(temperature, acc, v)
    if chosen is Backend.REFERENCE:
        s = student.to(acc)
        if valid is not None:  # ignored rows may hold anything: give them harmless values
            s = torch.where(valid.unsqueeze(1), s, s.new_zeros(()))
            lp_t = torch.where(valid.unsqueeze(1), lp_t, lp_t.new_zeros(()))
            idx = torch.where(valid.unsqueeze(1), idx, torch.arange(teacher.k, device=idx.device))
        w = reference.coarse_logits(s * a_s, idx)
        rows = reference.divergence_rows(w, lp_t, div.name, param_a=div.param_a, param_b=div.param_b)
        return rows if valid is None else torch.where(valid, rows, rows.new_zeros(()))
    check_no_tangent(who, student)
    valid_c = None if valid is None else valid.contiguous()
    w = _sparse_op.coarse(chosen)(student.contiguous(), idx, valid_c, a_s)
    div_backend = select(backend, student.device, acc, op="divergence")
    grad_on = torch.is_grad_enabled() and w.requires_grad
    if div_backend is Backend.REFERENCE:
        rows = reference.divergence_rows(w, lp_t, div.name, param_a=div.param_a, param_b=div.param_b)
        return rows if valid is None else torch.where(valid, rows, rows.new_zeros(()))
    rows, _, _ = _div_op.impl(div_backend)(w, lp_t.contiguous(), valid_c, div.code, div.param_a, div.param_b, 1.0,
                                           1.0, grad_on, False, 1.0)
    return rows
