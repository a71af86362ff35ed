"""Parity of tgtfast's divergence menu with the libraries and papers it follows.

Each peer's formula is written here as a short torch function (its source named in a comment), run on the peer's
own published cases (shapes, dtypes, tolerances, expected numbers), and compared with ``tgtfast.distill_loss`` /
``tgtfast.fused_linear_distill_loss`` on every backend available here ("reference" and "cpp"), value and gradient
wrt the student. Where the peer library is installed the library itself is compared too (``pytest.importorskip``
per library), so the tests pass with and without them.

Conventions, mapped explicitly in each test:

* TRL ``GKDTrainer.generalized_jsd_loss`` (``trl.experimental.gkd``): the same generalised JSD, the same beta
  (``m = beta p + (1 - beta) q``; beta = 0 forward KL, 1 reverse KL), the same temperature (both logits / T, no
  T**2). Its reductions are elementwise over ``[rows, V]``: ``"none"`` returns ``[rows, V]`` (tgtfast: per row, the
  sum over V), ``"mean"`` divides by ``rows * V`` (tgtfast's mean is per row: a factor V), ``"batchmean"`` without
  labels divides by ``logits.size(0)``, the batch size B of ``[B, L, V]`` logits (tgtfast: the B * L tokens);
  with labels both divide by the tokens not ignored, as does ``num_items_in_batch`` replacing that count.
* Liger-Kernel ``LigerJSD`` / ``liger_jsd``: takes log-probabilities (student first) as given, without
  normalising them again, same beta as TRL, a mean over rows not ignored. tgtfast takes logits and normalises:
  the same on normalised log-probs (bfloat16 / float16 rounding leaves ``sum exp != 1``, so the float64 truth
  normalises them). Liger differentiates wrt its log-prob input as free coordinates, tgtfast wrt logits: they
  agree through the log-softmax Jacobian, which the tests apply.
* Liger ``LigerTVDLoss``: takes probabilities; ``"mean"`` divides by ``rows * V`` (tgtfast: per row), ``"none"`` is
  elementwise. Subgradient where ``p_j == q_j``: tgtfast 0 (torch's abs); liger-kernel 0.8.5 from PyPI also 0, the
  Liger source on GitHub ``tl.where(p > q, 0.5, -0.5)``, i.e. -1/2. The random cases have no ties.
* Liger ``LigerFusedLinearJSDLoss`` (chunked_loss): ``weight_hard_loss * CE + weight_soft_loss * JSD(T)``, CE at
  temperature 1 on the student's logits, both divided by the tokens not ignored, no T**2: tgtfast's
  ``ce_weight``, ``kd_weight``, ``reduction="batchmean"``.
* torchtune ``ForwardKLLoss`` / ``ReverseKLLoss`` / ``SymmetricKLLoss`` (DistiLLM's losses): the forward KL is in
  cross-entropy form ``-sum p log q`` (KL plus the teacher's entropy: same gradient, value offset by the mean
  entropy); ``SymmetricKLLoss(sym_kd_ratio=r)`` weights the forward term by r, tgtfast's ``lam`` the reverse one:
  ``lam = 1 - r`` (DistiLLM's own ``symmetric_kl(lam)`` has tgtfast's convention). They mask elements where a logit
  is infinite: vocabulary padding with ``-inf`` in both models gives tgtfast's value, but ``ReverseKLLoss``'s
  gradient is then NaN (``0 * -inf`` in the backward of its masked product; tgtfast's is finite); a ``-inf`` in one
  model only turns tgtfast's ``+inf`` (the true divergence) into a finite number. They divide by the tokens not
  ignored and return 0 when all are.
* DistiLLM (github jongwooko/distillm, distillm/losses.py): ``skewed_forward_kl(lam)`` is tgtfast's
  ``skew_kl(alpha=lam)`` in cross-entropy form (value offset by the teacher's entropy), ``skewed_reverse_kl(lam)``
  is ``skew_reverse_kl(alpha=lam)`` exactly, ``js_distance(lam)`` is ``jsd(beta=1 - lam)`` for 0 < lam < 1 (at
  lam = 0 or 1 it is 0, where tgtfast's jsd endpoints are forward / reverse KL), ``tv_distance`` is ``tvd``.
* ABKD (github ghwang-s/abkd, distillation_llm/distillm/losses.py, ``ab_div``): the general case is tgtfast's
  ``ab_divergence(alpha, beta)`` with p the teacher (power alpha) and q the student (power beta). Its limit
  branches divide by alpha (or beta) once where Cichocki's limits (and tgtfast) divide by its square: ABKD's code
  is ``alpha`` (``beta`` at alpha = 0) times tgtfast there, and is not continuous with its own general case;
  tgtfast is (tested). At alpha = beta = 0 both are ``sum (lp - lq)**2 / 2``.

Optional libraries (requirements-test.txt): trl 1.16.0 (pulls transformers, accelerate, datasets), liger-kernel
0.8.5, torchtune 0.6.1 with torchao 0.16.0 (torchtune imports torchao at import time and 0.6.1 still imports
``torchao.dtypes.nf4tensor``, which torchao 0.17 moved). None of them replaces torch 2.13.0+cpu.

Not compared here without a GPU: Liger's Triton TVD kernel (Triton 3.9's interpreter fails on its
``scale.to(tl.float32)`` of a Python float), so it runs on CUDA only. Liger's Triton JSD kernel runs under
TRITON_INTERPRET=1 (tests/conftest.py sets it when no GPU is visible). Liger's chunked fused-linear JSD runs eagerly
(``compiled=False``); its torch.compile path is the same math and is left out to keep this file fast. The peers'
shapes keep their vocabulary sizes; their row counts are cut so that the file runs in well under a minute.
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F

import tgtfast

CUDA = torch.cuda.is_available()


def _backends(op):
    avail = tgtfast.backends(op=op)
    return [pytest.param(b, marks=pytest.mark.skipif(avail.get(b) != "available", reason=f"{b}: {avail.get(b)}"))
            for b in ("reference", "cpp")]


BACKENDS = _backends("divergence")
FL_BACKENDS = _backends("fused_linear_divergence")


@pytest.fixture(autouse=True)
def _one_thread():
    """The cases are small: one intra-op thread saves OpenMP's start-up on every op (most of their time on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def value_and_grad(fn, z, grad_scale=1.0):
    """fn(z) and d(sum fn(z) * grad_scale)/dz for a fresh leaf copy of z."""
    z = z.detach().clone().requires_grad_(True)
    out = fn(z)
    (out.sum() * grad_scale).backward()
    return out.detach(), z.grad


def assert_close(actual, expected, atol, rtol, what):
    actual, expected = actual.detach().double(), expected.detach().double()
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def logits(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype)


def entropy_mean(teacher_logits, labels=None, temperature=1.0, ignore_index=-100):
    """Mean teacher entropy over the rows not ignored: the offset of a cross-entropy-form forward KL."""
    lp = torch.log_softmax(teacher_logits.double() / temperature, -1)
    h = -torch.where(lp > -math.inf, lp.exp() * lp, 0.0).sum(-1).reshape(-1)  # 0 log 0 = 0
    if labels is None:
        return h.mean()
    valid = labels.reshape(-1) != ignore_index
    return (h * valid).sum() / valid.sum().clamp_min(1)


# --------------------------------------------------------------------------------------------------------------
# TRL
# --------------------------------------------------------------------------------------------------------------


def trl_generalized_jsd(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                        reduction="batchmean", num_items_in_batch=None):
    # huggingface/trl, trl/experimental/gkd/gkd_trainer.py, GKDTrainer.generalized_jsd_loss (trl 1.16.0)
    s = F.log_softmax(student_logits / temperature, dim=-1)
    t = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(s, t, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(t, s, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=s.dtype)
        m = torch.logsumexp(torch.stack([s + torch.log1p(-b), t + torch.log(b)]), dim=0)
        jsd = b * F.kl_div(m, t, reduction="none", log_target=True) + (1 - b) * F.kl_div(m, s, reduction="none",
                                                                                         log_target=True)
    if labels is not None:
        mask = labels != -100
        jsd = jsd[mask]
    if num_items_in_batch is not None:
        return jsd.sum() / num_items_in_batch
    if reduction == "batchmean":
        return jsd.sum() / (mask.sum().clamp_min(1) if labels is not None else max(jsd.size(0), 1))
    if reduction == "sum":
        return jsd.sum()
    if reduction == "mean":
        return jsd.mean()
    return jsd


def tgt_as_trl(z, t, labels, beta, temperature, reduction, num_items_in_batch, backend, **kw):
    """tgtfast.distill_loss in TRL's reduction conventions (see the module docstring)."""
    call = dict(beta=beta, temperature=temperature, target=labels, backend=backend, **kw)
    if num_items_in_batch is not None:
        return tgtfast.distill_loss(z, t, "jsd", reduction="batchmean", num_items_in_batch=num_items_in_batch, **call)
    if reduction == "batchmean" and labels is None and z.dim() == 3:  # TRL divides by logits.size(0) = B
        return tgtfast.distill_loss(z, t, "jsd", reduction="sum", **call) / z.shape[0]
    if reduction == "mean":  # TRL's mean is over rows x V
        return tgtfast.distill_loss(z, t, "jsd", reduction="mean", **call) / z.shape[-1]
    if reduction == "none":  # per row; TRL keeps [rows not ignored, V]
        rows = tgtfast.distill_loss(z, t, "jsd", reduction="none", **call)
        return rows if labels is None else rows[labels != -100]
    return tgtfast.distill_loss(z, t, "jsd", reduction=reduction, **call)


def trl_as_rows(out, reduction):
    return out.sum(-1) if reduction == "none" else out


def _trl_cases():
    # TRL's TestGeneralizedJSDLoss shape (2, 3, 5) and a larger one; its beta and temperature values, every reduction
    for shape in ((2, 3, 5), (3, 7, 37)):
        for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
            for temperature in (1.0, 2.0):
                for reduction in ("batchmean", "sum", "mean", "none"):
                    for labels in (False, True):
                        yield pytest.param(shape, beta, temperature, reduction, labels,
                                           id=f"{'x'.join(map(str, shape))}-b{beta}-T{temperature}-{reduction}"
                                              f"-{'labels' if labels else 'nolabels'}")


def _labels(lead, vocab, frac=0.3, all_ignored=False, ignore_index=-100):
    labels = torch.randint(0, vocab, lead)
    if all_ignored:
        labels[:] = ignore_index
    else:
        labels[torch.rand(lead) < frac] = ignore_index
        labels.view(-1)[0] = 0  # at least one row counts
    return labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, beta, temperature, reduction, use_labels", list(_trl_cases()))
def test_trl_generalized_jsd(backend, shape, beta, temperature, reduction, use_labels):
    z = logits(*shape, dtype=torch.float64, scale=2.0)
    t = logits(*shape, dtype=torch.float64, scale=2.0)
    labels = _labels(shape[:-1], shape[-1]) if use_labels else None

    def peer(x):
        return trl_as_rows(trl_generalized_jsd(x, t, labels, beta, temperature, reduction), reduction)

    def ours(x):
        return tgt_as_trl(x, t, labels, beta, temperature, reduction, None, backend)

    want, want_grad = value_and_grad(peer, z, grad_scale=2.0)
    got, got_grad = value_and_grad(ours, z, grad_scale=2.0)
    assert_close(got, want, 1e-12, 1e-10, "value")
    assert_close(got_grad, want_grad, 1e-12, 1e-9, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_trl_num_items_in_batch_and_t2(backend, beta):
    """num_items_in_batch replaces the count in both; t2_scaling=True is TRL's loss times T**2 (TRL has none)."""
    z, t = logits(4, 6, 11, dtype=torch.float64), logits(4, 6, 11, dtype=torch.float64)
    labels = _labels((4, 6), 11)
    for n in (7, torch.tensor(31)):
        want, want_grad = value_and_grad(lambda x: trl_generalized_jsd(x, t, labels, beta, 1.5,
                                                                       num_items_in_batch=n), z)
        got, got_grad = value_and_grad(lambda x: tgt_as_trl(x, t, labels, beta, 1.5, "batchmean", n, backend), z)
        assert_close(got, want, 1e-12, 1e-10, "value")
        assert_close(got_grad, want_grad, 1e-12, 1e-9, "grad")
    want = trl_generalized_jsd(z, t, labels, beta, 3.0)
    got = tgtfast.distill_loss(z, t, "jsd", beta=beta, temperature=3.0, target=labels, t2_scaling=True,
                               backend=backend)
    assert_close(got, want * 9.0, 1e-12, 1e-10, "T**2")


@pytest.mark.parametrize("backend", BACKENDS)
def test_trl_published_cases(backend):
    """TRL's own expectations (tests/experimental/test_gkd_trainer.py, TestGeneralizedJSDLoss) hold for tgtfast."""
    def jsd(s, t, **kw):
        return tgtfast.distill_loss(s, t, "jsd", backend=backend, **kw)

    uniform = torch.ones(1, 1, 5)
    assert abs(jsd(uniform, uniform).item()) < 1e-5  # test_uniform_distribution
    s = torch.log(torch.tensor([[0.1, 0.9]])).unsqueeze(0)  # test_generalized_jsd_loss_edge_cases
    t = torch.log(torch.tensor([[0.9, 0.1]])).unsqueeze(0)
    kl_st = F.kl_div(F.log_softmax(t, -1), F.softmax(s, -1), reduction="batchmean")  # KL(student || teacher)
    kl_ts = F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="batchmean")  # KL(teacher || student)
    assert round(abs(jsd(s, t, beta=1.0).item() - kl_st.item()), 5) == 0
    assert round(abs(jsd(s, t, beta=0.0).item() - kl_ts.item()), 5) == 0
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    assert jsd(s, t, beta=0.0) != jsd(s, t, beta=1.0)  # test_beta_values
    assert jsd(s, t, temperature=1.0) != jsd(s, t, temperature=2.0)  # test_temperature_scaling
    assert jsd(s, t, beta=0.1) != jsd(t, s, beta=0.1)  # test_symmetry
    assert_close(jsd(s, t, beta=0.5), jsd(t, s, beta=0.5), 1e-7, 1e-6, "symmetric at beta=0.5")
    same = torch.randn(2, 3, 5)
    assert round(abs(jsd(same, same).item()), 6) == 0  # test_zero_loss_for_identical_inputs
    assert jsd(s, t).shape == torch.Size([]) and jsd(s, t, reduction="none").shape == (2, 3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_trl_library(backend, beta, reduction):
    gkd = pytest.importorskip("trl.experimental.gkd", reason="trl not installed")
    z, t = logits(2, 5, 13, scale=2.0), logits(2, 5, 13, scale=2.0)
    labels = _labels((2, 5), 13)
    for lab in (None, labels):
        for temperature in (1.0, 2.0):
            want, want_grad = value_and_grad(lambda x: trl_as_rows(gkd.GKDTrainer.generalized_jsd_loss(
                x, t, labels=lab, beta=beta, temperature=temperature, reduction=reduction), reduction), z)
            got, got_grad = value_and_grad(
                lambda x: tgt_as_trl(x, t, lab, beta, temperature, reduction, None, backend), z)
            assert_close(got, want, 2e-6, 2e-5, "value")
            assert_close(got_grad, want_grad, 1e-7, 2e-5, "grad")
    want = gkd.GKDTrainer.generalized_jsd_loss(z, t, labels=labels, beta=beta, num_items_in_batch=torch.tensor(17))
    got = tgt_as_trl(z, t, labels, beta, 1.0, "batchmean", 17, backend)
    assert_close(got, want, 2e-6, 2e-5, "num_items_in_batch")


# --------------------------------------------------------------------------------------------------------------
# Liger-Kernel: JSD and TVD (Triton kernels), fused linear JSD (chunked_loss)
# --------------------------------------------------------------------------------------------------------------


def liger_jsd_formula(log_q, log_p, label=None, beta=0.5, ignore_index=-100):
    # linkedin/Liger-Kernel, src/liger_kernel/ops/jsd.py, _jsd_kernel (JSD in test/transformers/test_jsd.py likewise)
    log_q, log_p = log_q.double(), log_p.double()
    q, p = log_q.exp(), log_p.exp()
    if beta == 0.0:
        loss = p * (log_p - log_q)
    elif beta == 1.0:
        loss = q * (log_q - log_p)
    else:
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        loss = beta * p * (log_p - log_m) + (1 - beta) * q * (log_q - log_m)
    loss = loss.sum(-1)
    if label is None:
        return loss.sum() / log_q.shape[0]
    valid = label != ignore_index
    return torch.where(valid, loss, 0.0).sum() / max(int(valid.sum()), 1)


# test/transformers/test_jsd.py: _SHAPE_PARAMS (2, 1024, 3200) and (41, 401, 1271), rows cut; _DTYPE_PARAMS
LIGER_JSD_SHAPES = [(2, 32, 3200), (41, 3, 1271)]
LIGER_JSD_DTYPES = [(torch.bfloat16, 1e-7, 5e-2), (torch.float32, 1e-7, 1e-6), (torch.float16, 1e-3, 1e-3)]


def _liger_jsd_inputs(b, t, v, dtype, device="cpu"):
    z = torch.randn(b * t, v, dtype=dtype, device=device)  # the leaf: logits (Liger's input is their log_softmax)
    log_p = torch.randn(b * t, v, dtype=dtype, device=device).log_softmax(dim=-1)
    return z, log_p


def _liger_label(n, v, ignore_index, device="cpu"):
    label = torch.randint(0, v, (n,), device=device)
    k = int(torch.randint(1, max(n // 2, 2), (1,)))
    label[torch.randperm(n, device=device)[:k]] = ignore_index
    return label


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B, T, V", LIGER_JSD_SHAPES)
@pytest.mark.parametrize("dtype, atol, rtol", LIGER_JSD_DTYPES)
@pytest.mark.parametrize("beta, ignore_index, grad_scale", [
    (0.0, None, 1.0), (0.1, None, 1.0), (0.5, None, 2.0), (0.9, None, 1.0), (1.0, None, 1.0),  # test_correctness*
    (0.5, 2, 2.0), (0.1, 42, 1.0),  # test_correctness_with_ignore_index / _functional
])
def test_liger_jsd(backend, B, T, V, dtype, atol, rtol, beta, ignore_index, grad_scale):
    z, log_p = _liger_jsd_inputs(B, T, V, dtype)
    label = None if ignore_index is None else _liger_label(B * T, V, ignore_index)
    kw = {} if label is None else dict(target=label, ignore_index=ignore_index)

    def peer(x):  # Liger takes log_p as given: normalised again here, as bf16/fp16 rounding leaves sum(p) != 1
        return liger_jsd_formula(x.log_softmax(-1), log_p.double().log_softmax(-1), label, beta,
                                 -100 if ignore_index is None else ignore_index)

    truth, truth_grad = value_and_grad(peer, z.double(), grad_scale)
    exact, exact_grad = value_and_grad(
        lambda x: tgtfast.distill_loss(x, log_p.double(), "jsd", beta=beta, backend=backend, **kw), z.double(),
        grad_scale)
    assert_close(exact, truth, 1e-12, 1e-10, "float64 value")
    assert_close(exact_grad, truth_grad, 1e-14, 1e-9, "float64 grad")
    got, got_grad = value_and_grad(
        lambda x: tgtfast.distill_loss(x, log_p, "jsd", beta=beta, backend=backend, **kw), z, grad_scale)
    assert got_grad.dtype == dtype
    assert_close(got, truth, atol, rtol, f"{dtype} value")
    assert_close(got_grad, truth_grad, atol, rtol, f"{dtype} grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_liger_jsd_all_ignored(backend):
    """test_correctness_with_all_indices_ignored: B=2, T=10, V=32, bfloat16: loss 0 and gradient 0."""
    z, log_p = _liger_jsd_inputs(2, 10, 32, torch.bfloat16)
    label = torch.full((20,), -100)
    got, grad = value_and_grad(lambda x: tgtfast.distill_loss(x, log_p, "jsd", target=label, backend=backend), z)
    assert got.item() == 0.0 and not grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, atol, rtol", LIGER_JSD_DTYPES)
@pytest.mark.parametrize("beta, ignore_index", [(0.0, None), (0.1, 42), (0.5, 2), (0.9, None), (1.0, -100)])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # masked lanes: -inf - -inf
def test_liger_jsd_library(backend, dtype, atol, rtol, beta, ignore_index):
    jsd = pytest.importorskip("liger_kernel.transformers.functional", reason="liger-kernel not installed").liger_jsd
    if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Liger's Triton JSD needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if CUDA else "cpu"
    n, v = (41 * 401, 1271) if CUDA else (48, 1271)  # the interpreter runs one program at a time
    z, log_p = _liger_jsd_inputs(1, n, v, dtype, device)
    x = z.log_softmax(dim=-1)  # Liger's input, as its tests make it; the leaf of its gradient
    label = None if ignore_index is None else _liger_label(n, v, ignore_index, device)
    want, d_x = value_and_grad(lambda u: jsd(u, log_p, label, beta, -100 if ignore_index is None else ignore_index), x)
    # Liger's gradient is wrt x as free coordinates; through the log-softmax (float64) it is tgtfast's wrt logits
    x64, d_x = x.double().cpu(), d_x.double().cpu()
    want_grad = d_x - x64.softmax(-1) * d_x.sum(-1, keepdim=True)
    dev = device if backend == "reference" else "cpu"
    kw = {} if label is None else dict(target=label.to(dev), ignore_index=ignore_index)
    got, got_grad = value_and_grad(
        lambda u: tgtfast.distill_loss(u, log_p.to(dev), "jsd", beta=beta, backend=backend, **kw), x.to(dev))
    assert_close(got.cpu(), want.float().cpu(), atol, rtol, "value")
    # Liger returns d/dx in the input dtype; in bfloat16 / float16 the projection above cancels its rounding
    # (dX and q sum(dX) nearly equal), so allow one rounding of Liger's largest entry in absolute terms
    grad_atol = max(atol, (torch.finfo(dtype).eps / 2) * float(d_x.abs().max())) if dtype != torch.float32 else atol
    assert_close(got_grad.cpu(), want_grad, grad_atol, rtol, "grad")


def liger_tvd_formula(p, q, label=None, reduction="batchmean", ignore_index=-100):
    # linkedin/Liger-Kernel, test/transformers/test_tvd.py, TorchTVDLoss (the reference of LigerTVDLoss)
    tvd = torch.abs(p - q) / 2.0
    n_non_ignore = p.size(0)
    if label is not None:
        tvd = torch.where(label.unsqueeze(1) != ignore_index, tvd, torch.zeros_like(tvd))
        n_non_ignore = int((label != ignore_index).sum())
        if n_non_ignore == 0:
            return torch.tensor(0.0, dtype=p.dtype)
    if reduction == "mean":
        return torch.sum(tvd) / (n_non_ignore * p.size(1))
    if reduction == "sum":
        return torch.sum(tvd)
    if reduction == "none":
        return tvd
    return torch.sum(tvd) / n_non_ignore


def tgt_as_liger_tvd(z, zt, label, reduction, ignore_index, backend):
    kw = {} if label is None else dict(target=label, ignore_index=ignore_index)
    out = tgtfast.distill_loss(z, zt, "tvd", reduction=reduction, backend=backend, **kw)
    return out / z.shape[-1] if reduction == "mean" else out  # Liger's mean is over rows x V


# test/transformers/test_tvd.py: _SHAPE_PARAMS (1, 4096, 32000), (32, 4096, 1024), (41, 401, 1271), (3, 423, 32000),
# rows cut; _DTYPE_PARAMS bfloat16 and float32 (1e-8, 1e-6). Gradients come back in the input dtype: for bfloat16 the
# gradient is compared at bfloat16's rounding (Liger's 1e-6 is its kernel against torch on the same bf16 input).
LIGER_TVD_SHAPES = [(1, 6, 32000), (32, 2, 1024), (41, 3, 1271), (3, 5, 32000)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B, T, V", LIGER_TVD_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("ignore_index", [None, -100, 0, 1])
def test_liger_tvd(backend, B, T, V, dtype, reduction, ignore_index):
    z, zt = logits(B * T, V, dtype=dtype), logits(B * T, V, dtype=dtype)
    label = None if ignore_index is None else _liger_label(B * T, V, ignore_index)

    def peer(x):
        out = liger_tvd_formula(x.double().softmax(-1), zt.double().softmax(-1), label, reduction,
                                -100 if ignore_index is None else ignore_index)
        return out.sum(-1) if reduction == "none" else out

    truth, truth_grad = value_and_grad(peer, z.double(), grad_scale=2.0)
    exact, exact_grad = value_and_grad(
        lambda x: tgt_as_liger_tvd(x, zt.double(), label, reduction, ignore_index, backend), z.double(), 2.0)
    assert_close(exact, truth, 1e-12, 1e-10, "float64 value")
    assert_close(exact_grad, truth_grad, 1e-14, 1e-9, "float64 grad")
    got, got_grad = value_and_grad(lambda x: tgt_as_liger_tvd(x, zt, label, reduction, ignore_index, backend), z, 2.0)
    assert_close(got, truth, 1e-8, 1e-6, f"{dtype} value")
    # The gradient jumps by q_j where p_j = q_j: leave out the classes within float32 rounding of a tie, where the
    # sign of p - q computed in float32 may differ from float64's (a tie's subgradient is tested in test_tvd_ties).
    p, q = zt.double().softmax(-1), z.double().softmax(-1)
    far = (p - q).abs() > 1e-5 * (p + q)
    grad_tol = dict(atol=1e-8, rtol=1e-6) if dtype == torch.float32 else dict(atol=1e-12, rtol=2**-7)
    assert_close(got_grad[far], truth_grad[far], what=f"{dtype} grad", **grad_tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tvd_ties(backend):
    """Where p == q in a whole row the loss and the gradient are 0 (the subgradient at a tie is 0 in tgtfast)."""
    z = logits(4, 33)
    got, grad = value_and_grad(lambda x: tgtfast.distill_loss(x, z, "tvd", backend=backend), z)
    assert got.item() == 0.0 and not grad.any()


@pytest.mark.skipif(not CUDA, reason="Liger's Triton TVD kernel needs CUDA (Triton's interpreter fails on it)")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_liger_tvd_library(backend, reduction):
    tvd_mod = pytest.importorskip("liger_kernel.transformers.tvd", reason="liger-kernel not installed")
    z, zt = logits(41 * 401, 1271).cuda(), logits(41 * 401, 1271).cuda()
    label = _liger_label(41 * 401, 1271, -100, "cuda")
    loss = tvd_mod.LigerTVDLoss(reduction=reduction)
    want, want_grad = value_and_grad(lambda x: (lambda o: o.sum(-1) if reduction == "none" else o)(
        loss(x.softmax(-1), zt.softmax(-1), label)), z)
    dev = "cuda" if backend == "reference" else "cpu"
    got, got_grad = value_and_grad(
        lambda x: tgt_as_liger_tvd(x, zt.to(dev), label.to(dev), reduction, -100, backend), z.to(dev))
    assert_close(got.cpu(), want.cpu(), 1e-6, 1e-5, "value")
    assert_close(got_grad.cpu(), want_grad.cpu(), 1e-8, 1e-5, "grad")


def liger_fused_linear_jsd_formula(student_input, student_weight, teacher_input, teacher_weight, target,
                                   student_bias, teacher_bias, weight_hard_loss, weight_soft_loss, beta,
                                   ignore_index, temperature):
    # linkedin/Liger-Kernel, test/chunked_loss/test_jsd_loss.py, HFJSDLoss + test/utils.py HFDistillationLoss
    # (the reference of LigerFusedLinearJSDLoss), in float64
    s = student_input.double() @ student_weight.double().t()
    if student_bias is not None:
        s = s + student_bias.double()
    with torch.no_grad():
        t = teacher_input.double() @ teacher_weight.double().t()
        if teacher_bias is not None:
            t = t + teacher_bias.double()
    if torch.all(target == ignore_index):
        return torch.zeros((), dtype=torch.float64)
    hard = F.cross_entropy(s, target, ignore_index=ignore_index)
    ls, lt = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
    if beta == 0:
        jsd = F.kl_div(ls, lt, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(lt, ls, reduction="none", log_target=True)
    else:
        lm = torch.logsumexp(torch.stack([ls + math.log(1 - beta), lt + math.log(beta)]), 0)
        jsd = beta * F.kl_div(lm, lt, reduction="none", log_target=True) + (1 - beta) * F.kl_div(
            lm, ls, reduction="none", log_target=True)
    mask = target != ignore_index
    soft = (jsd.sum(-1) * mask).sum() / mask.sum().clamp_min(1)
    return weight_hard_loss * hard + weight_soft_loss * soft


def _fl_case(B, T, H, V, dtype, bias):
    """test_correctness's inputs: student [B*T, H/2] and weight [V, H/2], teacher [B*T, H] and [V, H], uniform."""
    x = dict(student_input=torch.rand(B * T, H // 2, dtype=dtype), student_weight=torch.rand(V, H // 2, dtype=dtype),
             teacher_input=torch.rand(B * T, H, dtype=dtype), teacher_weight=torch.rand(V, H, dtype=dtype),
             student_bias=torch.rand(V, dtype=dtype) if bias else None,
             teacher_bias=torch.rand(V, dtype=dtype) if bias else None)
    return x


def _fl_grads(fn, x):
    leaves = {k: (v.detach().clone().requires_grad_(k.startswith("student")) if v is not None else None)
              for k, v in x.items()}
    out = fn(**leaves)
    out.backward()
    return out.detach(), {k: v.grad for k, v in leaves.items() if v is not None and v.requires_grad}


def tgt_as_liger_fl(student_input, student_weight, teacher_input, teacher_weight, target, student_bias,
                    teacher_bias, weight_hard_loss, weight_soft_loss, beta, ignore_index, temperature, backend):
    return tgtfast.fused_linear_distill_loss(
        student_input, student_weight, teacher_input, teacher_weight, "jsd", beta=beta, student_bias=student_bias,
        teacher_bias=teacher_bias, temperature=temperature, target=target, ignore_index=ignore_index,
        reduction="batchmean", kd_weight=weight_soft_loss, ce_weight=weight_hard_loss, backend=backend)


# test/chunked_loss/test_jsd_loss.py, test_correctness: shapes (8, 128, 1024, 4096) (cut) and (3, 47, 31, 123);
# dtypes (bf16, 5e-2, 5e-1), (fp32, 1e-5, 5e-4); bias; (temperature, weight_hard, weight_soft, beta); ignore_index
@pytest.mark.parametrize("backend", FL_BACKENDS)
@pytest.mark.parametrize("B, T, H, V", [(2, 8, 128, 512), (3, 47, 31, 123)])
@pytest.mark.parametrize("dtype, atol, rtol", [(torch.bfloat16, 5e-2, 5e-1), (torch.float32, 1e-5, 5e-4)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("temperature, weight_hard_loss, weight_soft_loss, beta",
                         [(1.0, 0.5, 0.5, 0.5), (2.0, 0.0, 1.0, 0.8), (0.5, 1.0, 0.0, 0.2)])
@pytest.mark.parametrize("ignore_index", [-100, 42])
def test_liger_fused_linear_jsd(backend, B, T, H, V, dtype, atol, rtol, bias, temperature, weight_hard_loss,
                                weight_soft_loss, beta, ignore_index):
    x = _fl_case(B, T, H, V, dtype, bias)
    target = _liger_label(B * T, V, ignore_index)
    common = dict(target=target, weight_hard_loss=weight_hard_loss, weight_soft_loss=weight_soft_loss, beta=beta,
                  ignore_index=ignore_index, temperature=temperature)
    x64 = {k: None if v is None else v.double() for k, v in x.items()}
    truth, truth_grads = _fl_grads(lambda **a: liger_fused_linear_jsd_formula(**a, **common), x64)
    exact, exact_grads = _fl_grads(lambda **a: tgt_as_liger_fl(**a, **common, backend=backend), x64)
    assert_close(exact, truth, 1e-10, 1e-10, "float64 value")
    for k in truth_grads:
        assert_close(exact_grads[k], truth_grads[k], 1e-10, 1e-8, f"float64 grad {k}")
    got, got_grads = _fl_grads(lambda **a: tgt_as_liger_fl(**a, **common, backend=backend), x)
    assert_close(got, truth, atol, rtol, f"{dtype} value")
    for k in truth_grads:
        assert got_grads[k].dtype == dtype
        assert_close(got_grads[k], truth_grads[k], atol, rtol, f"{dtype} grad {k}")


@pytest.mark.parametrize("backend", FL_BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("temperature, weight_hard_loss, weight_soft_loss, beta, ignore_index",
                         [(1.0, 0.5, 0.5, 0.5, -100), (2.0, 0.1, 0.9, 0.5, 42), (2.0, 0.0, 1.0, 0.8, -100),
                          (0.5, 1.0, 0.0, 0.2, 42), (1.0, 0.3, 0.7, 0.0, -100), (1.0, 0.3, 0.7, 1.0, -100)])
def test_liger_fused_linear_jsd_library(backend, bias, temperature, weight_hard_loss, weight_soft_loss, beta,
                                        ignore_index):
    chunked = pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel not installed")
    B, T, H, V = 3, 47, 31, 123  # test_correctness's second shape, float32 (its 1e-5, 5e-4)
    x = _fl_case(B, T, H, V, torch.float32, bias)
    target = _liger_label(B * T, V, ignore_index)
    loss = chunked.LigerFusedLinearJSDLoss(weight_hard_loss=weight_hard_loss, weight_soft_loss=weight_soft_loss,
                                           beta=beta, ignore_index=ignore_index, temperature=temperature,
                                           compiled=False, chunk_size=64)

    def liger(student_input, student_weight, teacher_input, teacher_weight, student_bias, teacher_bias):
        return loss(student_input, student_weight, teacher_input, teacher_weight, target, student_bias, teacher_bias)

    want, want_grads = _fl_grads(liger, x)
    got, got_grads = _fl_grads(lambda **a: tgt_as_liger_fl(
        **a, target=target, weight_hard_loss=weight_hard_loss, weight_soft_loss=weight_soft_loss, beta=beta,
        ignore_index=ignore_index, temperature=temperature, backend=backend), x)
    assert_close(got, want, 1e-5, 5e-4, "value")
    for k in want_grads:
        assert_close(got_grads[k], want_grads[k], 1e-5, 5e-4, f"grad {k}")


# --------------------------------------------------------------------------------------------------------------
# torchtune (DistiLLM's forward / reverse / symmetric KL)
# --------------------------------------------------------------------------------------------------------------


def tt_forward_kl(student_logits, teacher_logits, labels, ignore_index=-100, acc=torch.float32):
    # pytorch/torchtune, torchtune/modules/loss/kd_losses.py, ForwardKLLoss.forward (torchtune 0.6.1)
    teacher_prob = F.softmax(teacher_logits, dim=-1, dtype=acc)
    inf_mask = torch.isinf(student_logits)
    student_logprob = F.log_softmax(student_logits, dim=-1, dtype=acc)
    prod_probs = torch.masked_fill(teacher_prob * student_logprob, inf_mask, 0)
    x = torch.sum(prod_probs, dim=-1).view(-1)
    mask = (labels != ignore_index).int()
    if torch.sum(mask.view(-1)) == 0:
        return torch.tensor(0.0, dtype=acc)
    return -torch.sum(x * mask.view(-1), dim=0) / torch.sum(mask.view(-1), dim=0)


def tt_reverse_kl(student_logits, teacher_logits, labels, ignore_index=-100, acc=torch.float32):
    # pytorch/torchtune, torchtune/modules/loss/kd_losses.py, ReverseKLLoss.forward (torchtune 0.6.1)
    student_prob = F.softmax(student_logits, dim=-1, dtype=acc)
    student_logprob = F.log_softmax(student_logits, dim=-1, dtype=acc)
    teacher_logprob = F.log_softmax(teacher_logits, dim=-1, dtype=acc)
    inf_mask = torch.isinf(student_logits) | torch.isinf(teacher_logits)
    prod_probs = torch.masked_fill(student_prob * teacher_logprob, inf_mask, 0)
    prod_probs = prod_probs - torch.masked_fill(student_prob * student_logprob, inf_mask, 0)
    x = torch.sum(prod_probs, dim=-1).view(-1)
    mask = (labels != ignore_index).int()
    if torch.sum(mask.view(-1)) == 0:
        return torch.tensor(0.0, dtype=acc)
    return -torch.sum(x * mask.view(-1), dim=0) / torch.sum(mask.view(-1), dim=0)


def tt_symmetric_kl(student_logits, teacher_logits, labels, sym_kd_ratio=0.5, ignore_index=-100, acc=torch.float32):
    # pytorch/torchtune, torchtune/modules/loss/kd_losses.py, SymmetricKLLoss.forward (torchtune 0.6.1)
    return (sym_kd_ratio * tt_forward_kl(student_logits, teacher_logits, labels, ignore_index, acc)
            + (1 - sym_kd_ratio) * tt_reverse_kl(student_logits, teacher_logits, labels, ignore_index, acc))


def tgt_as_torchtune(kind, z, t, labels, ratio, backend, ignore_index=-100):
    """tgtfast in torchtune's conventions: forward KL in cross-entropy form, lam = 1 - sym_kd_ratio."""
    kw = dict(target=labels, ignore_index=ignore_index, backend=backend)
    if kind == "forward":
        return tgtfast.distill_loss(z, t, "forward_kl", **kw) + entropy_mean(t, labels, ignore_index=ignore_index)
    if kind == "reverse":
        return tgtfast.distill_loss(z, t, "reverse_kl", **kw)
    return (tgtfast.distill_loss(z, t, "symmetric_kl", lam=1.0 - ratio, **kw)
            + ratio * entropy_mean(t, labels, ignore_index=ignore_index))


TT = {"forward": tt_forward_kl, "reverse": tt_reverse_kl}

# tests/torchtune/modules/loss/test_kd_losses.py: test_*_kl_loss_expected (bfloat16 [2, 4, 4], labels, rtol=atol=1e-2)
TT_STUDENT = [[[1.1250, -0.4102, -0.0879, -2.5000], [0.2676, 0.3535, 0.8711, -1.4688],
               [-0.1084, 1.6641, 0.0084, 0.1196], [0.5000, -0.6406, -0.2236, -1.5938]],
              [[-1.5312, -1.9219, 0.0000, -0.5039], [-1.5391, 1.5312, 0.5820, 0.2695],
               [-0.3887, 1.2188, 0.0000, 0.6055], [0.5000, 1.3828, 0.1309, -1.0312]]]
TT_TEACHER = [[[-0.0381, -1.2578, -1.2031, 0.0947], [-0.7852, 0.4492, 1.5547, 0.0972],
               [0.8203, 0.0012, 0.7656, 0.3477], [-1.5781, 0.4297, 0.5977, 0.3926]],
              [[1.5156, 0.1641, 2.0781, -0.7734], [-0.5898, 0.4453, -0.7969, 0.6328],
               [0.6289, -0.8359, 0.9258, 0.2109], [0.0006, 0.5195, 3.2344, -1.5781]]]
TT_LABELS = [[0, 3, 3, 1], [1, 1, 1, 1]]
TT_EXPECTED = {"forward": 1.7209, "reverse": 0.6775, "symmetric": 1.1992}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["forward", "reverse", "symmetric"])
def test_torchtune_published_values(backend, kind):
    s, t = torch.tensor(TT_STUDENT, dtype=torch.bfloat16), torch.tensor(TT_TEACHER, dtype=torch.bfloat16)
    labels = torch.tensor(TT_LABELS)
    got = tgt_as_torchtune(kind, s, t, labels, 0.5, backend)
    assert_close(got, torch.tensor(TT_EXPECTED[kind]), 1e-2, 1e-2, kind)
    if kind == "reverse":  # no entropy offset: tgtfast's own value is torchtune's
        assert_close(tgtfast.distill_loss(s, t, "reverse_kl", target=labels, backend=backend),
                     torch.tensor(0.6775), 1e-2, 1e-2, "reverse_kl")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind, ratio", [("forward", None), ("reverse", None), ("symmetric", 0.5),
                                         ("symmetric", 0.0), ("symmetric", 0.3), ("symmetric", 1.0)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_torchtune_random(backend, kind, ratio, dtype):
    """test_*_kl_loss's case: bfloat16 [3, 50, 50] logits, random ignored tokens (and float64 for exact parity)."""
    s, t = logits(3, 50, 50, dtype=dtype), logits(3, 50, 50, dtype=dtype)
    labels = torch.randint(0, 50, (3, 50))
    labels[torch.randint(0, 50, (3, 50)) < 10] = -100
    acc = torch.float64

    def peer(x):
        if kind == "symmetric":
            return tt_symmetric_kl(x, t, labels, ratio, acc=acc)
        return TT[kind](x, t, labels, acc=acc)

    want, want_grad = value_and_grad(peer, s.double())
    got, got_grad = value_and_grad(lambda x: tgt_as_torchtune(kind, x, t, labels, ratio, backend), s)
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-6, rtol=1e-5)
    assert_close(got, want, what="value", **tol)
    gtol = tol if dtype == torch.float64 else dict(atol=1e-9, rtol=2**-7)
    assert_close(got_grad, want_grad, what="grad", **gtol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torchtune_masking(backend):
    """All tokens ignored: 0 in both. Vocabulary padding (-inf in both models' same columns) is left out by both. A
    -inf in one model only: torchtune masks it away, tgtfast returns the true divergence, +inf."""
    s, t = logits(2, 6, 9, dtype=torch.float64), logits(2, 6, 9, dtype=torch.float64)
    none = torch.full((2, 6), -100)
    for kind in ("forward", "reverse"):
        assert TT[kind](s, t, none).item() == 0.0
        assert tgtfast.distill_loss(s, t, f"{kind}_kl", target=none, backend=backend).item() == 0.0
    labels = _labels((2, 6), 9)
    sp, tp = s.clone(), t.clone()
    sp[..., -2:] = -math.inf
    tp[..., -2:] = -math.inf
    for kind in ("forward", "reverse"):
        want, want_grad = value_and_grad(lambda x: TT[kind](x, tp, labels, acc=torch.float64), sp)
        got, got_grad = value_and_grad(lambda x: tgt_as_torchtune(kind, x, tp, labels, None, backend), sp)
        assert_close(got, want, 1e-12, 1e-10, f"{kind} padded value")
        # the padded problem's gradient is the unpadded one's, 0 on the padding
        _, cut_grad = value_and_grad(lambda x: TT[kind](x, t[..., :-2], labels, acc=torch.float64), s[..., :-2])
        assert_close(got_grad[..., :-2], cut_grad, 1e-12, 1e-9, f"{kind} padded grad")
        assert not got_grad[..., -2:].any()
        if kind == "forward":
            assert_close(want_grad, got_grad, 1e-12, 1e-9, "forward padded grad (torchtune)")
        else:  # torchtune's masked_fill keeps 0 * -inf in the backward of q * log p: its gradient is NaN there
            assert want_grad.isnan().all()
    t_hole = t.clone()
    t_hole[0, 0, 3] = -math.inf  # the teacher gives class 3 no mass; the student does
    assert torch.isfinite(tt_reverse_kl(s, t_hole, labels, acc=torch.float64))
    assert math.isinf(tgtfast.distill_loss(s, t_hole, "reverse_kl", target=labels, backend=backend).item())
    s_hole = s.clone()
    s_hole[0, 0, 3] = -math.inf  # the student gives class 3 no mass; the teacher does
    assert torch.isfinite(tt_forward_kl(s_hole, t, labels, acc=torch.float64))
    assert math.isinf(tgtfast.distill_loss(s_hole, t, "forward_kl", target=labels, backend=backend).item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind, ratio", [("forward", None), ("reverse", None), ("symmetric", 0.5),
                                         ("symmetric", 0.2)])
def test_torchtune_library(backend, kind, ratio):
    loss_mod = pytest.importorskip("torchtune.modules.loss", reason="torchtune not installed")
    cls = {"forward": loss_mod.ForwardKLLoss, "reverse": loss_mod.ReverseKLLoss}
    fn = loss_mod.SymmetricKLLoss(sym_kd_ratio=ratio) if kind == "symmetric" else cls[kind]()
    # test_*_kl_loss's bfloat16 [3, 50, 50] logits, given to both in float32 (torchtune computes in float32; in
    # bfloat16 both gradients would be rounded to bfloat16 and compared at that rounding only)
    s, t = logits(3, 50, 50, dtype=torch.bfloat16).float(), logits(3, 50, 50, dtype=torch.bfloat16).float()
    labels = torch.randint(0, 50, (3, 50))
    labels[torch.randint(0, 50, (3, 50)) < 10] = -100
    want, want_grad = value_and_grad(lambda x: fn(x.reshape(-1, 50), t.reshape(-1, 50), labels.reshape(-1)), s)
    got, got_grad = value_and_grad(lambda x: tgt_as_torchtune(kind, x, t, labels, ratio, backend), s)
    assert_close(got, want, 1e-6, 1e-5, "value")
    assert_close(got_grad, want_grad, 1e-9, 1e-5, "grad")
    s, t = torch.tensor(TT_STUDENT, dtype=torch.bfloat16), torch.tensor(TT_TEACHER, dtype=torch.bfloat16)
    if kind != "symmetric" or ratio == 0.5:
        assert_close(fn(s, t, torch.tensor(TT_LABELS)), torch.tensor(TT_EXPECTED[kind]), 1e-2, 1e-2, "published")


# --------------------------------------------------------------------------------------------------------------
# DistiLLM: skew KL, skew reverse KL, its JS and TV distances
# --------------------------------------------------------------------------------------------------------------


def _dl_token_mean(x, labels):
    """DistiLLM's reduction: ``sum(x * mask) / sum(mask)`` over the tokens whose label is not -100."""
    mask = (labels != -100).int().view(-1)
    return torch.sum(x.view(-1) * mask, dim=0) / torch.sum(mask, dim=0)


def distillm_skewed_forward_kl(logits_, teacher_logits, labels, lam=0.1, acc=torch.float64):
    # jongwooko/distillm, distillm/losses.py, skewed_forward_kl
    teacher_probs = F.softmax(teacher_logits, dim=-1, dtype=acc)
    student_probs = F.softmax(logits_, dim=-1, dtype=acc)
    mixed_logprobs = torch.log(lam * teacher_probs + (1 - lam) * student_probs)
    inf_mask = torch.isinf(logits_) | torch.isinf(teacher_logits)
    return -_dl_token_mean(torch.sum(torch.masked_fill(teacher_probs * mixed_logprobs, inf_mask, 0), dim=-1), labels)


def distillm_skewed_reverse_kl(logits_, teacher_logits, labels, lam=0.1, acc=torch.float64):
    # jongwooko/distillm, distillm/losses.py, skewed_reverse_kl
    teacher_probs = F.softmax(teacher_logits, dim=-1, dtype=acc)
    student_probs = F.softmax(logits_, dim=-1, dtype=acc)
    mixed_logprobs = torch.log((1 - lam) * teacher_probs + lam * student_probs)
    student_logprobs = F.log_softmax(logits_, dim=-1, dtype=acc)
    inf_mask = torch.isinf(logits_) | torch.isinf(teacher_logits)
    prod = torch.masked_fill(student_probs * mixed_logprobs, inf_mask, 0)
    prod = prod - torch.masked_fill(student_probs * student_logprobs, inf_mask, 0)
    return -_dl_token_mean(torch.sum(prod, dim=-1), labels)


def distillm_js_distance(logits_, teacher_logits, labels, lam=0.9, acc=torch.float64):
    # jongwooko/distillm, distillm/losses.py, js_distance
    teacher_probs = F.softmax(teacher_logits, dim=-1, dtype=acc)
    student_probs = F.softmax(logits_, dim=-1, dtype=acc)
    mixed_logprobs = torch.log((1 - lam) * teacher_probs + lam * student_probs)
    teacher_logprobs = F.log_softmax(teacher_logits, dim=-1, dtype=acc)
    student_logprobs = F.log_softmax(logits_, dim=-1, dtype=acc)
    inf_mask = torch.isinf(logits_) | torch.isinf(teacher_logits)
    prod = torch.masked_fill(student_probs * mixed_logprobs, inf_mask, 0)
    prod = prod - torch.masked_fill(student_probs * student_logprobs, inf_mask, 0)
    loss = lam * -_dl_token_mean(torch.sum(prod, -1), labels)
    prod = torch.masked_fill(teacher_probs * mixed_logprobs, inf_mask, 0)
    prod = prod - torch.masked_fill(teacher_probs * teacher_logprobs, inf_mask, 0)
    return loss + (1 - lam) * -_dl_token_mean(torch.sum(prod, -1), labels)


def distillm_tv_distance(logits_, teacher_logits, labels, acc=torch.float64):
    # jongwooko/distillm, distillm/losses.py, tv_distance
    teacher_probs = F.softmax(teacher_logits, dim=-1, dtype=acc)
    student_probs = F.softmax(logits_, dim=-1, dtype=acc)
    inf_mask = torch.isinf(logits_) | torch.isinf(teacher_logits)
    return _dl_token_mean(torch.sum(0.5 * torch.masked_fill(torch.abs(teacher_probs - student_probs), inf_mask, 0),
                                    -1), labels)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["skew_kl", "skew_reverse_kl", "js", "tv"])
@pytest.mark.parametrize("lam", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_distillm(backend, kind, lam):
    if kind == "js" and lam in (0.0, 1.0):
        pytest.skip("DistiLLM's js_distance is 0 at lam = 0 and 1; tgtfast's jsd endpoints are KL (TRL's)")
    if kind == "tv" and lam != 0.1:
        pytest.skip("tv_distance takes no parameter")
    s, t = logits(2, 9, 64, dtype=torch.float64, scale=2.0), logits(2, 9, 64, dtype=torch.float64, scale=2.0)
    labels = _labels((2, 9), 64)
    kw = dict(target=labels, backend=backend)
    peer, ours = {
        "skew_kl": (lambda x: distillm_skewed_forward_kl(x, t, labels, lam),
                    lambda x: tgtfast.distill_loss(x, t, "skew_kl", alpha=lam, **kw) + entropy_mean(t, labels)),
        "skew_reverse_kl": (lambda x: distillm_skewed_reverse_kl(x, t, labels, lam),
                            lambda x: tgtfast.distill_loss(x, t, "skew_reverse_kl", alpha=lam, **kw)),
        "js": (lambda x: distillm_js_distance(x, t, labels, lam),
               lambda x: tgtfast.distill_loss(x, t, "jsd", beta=1.0 - lam, **kw)),
        "tv": (lambda x: distillm_tv_distance(x, t, labels), lambda x: tgtfast.distill_loss(x, t, "tvd", **kw)),
    }[kind]
    want, want_grad = value_and_grad(peer, s, 2.0)
    got, got_grad = value_and_grad(ours, s, 2.0)
    assert_close(got, want, 1e-12, 1e-10, "value")
    assert_close(got_grad, want_grad, 1e-13, 1e-9, "grad")
    if kind in ("skew_kl", "skew_reverse_kl"):  # float32 logits, the usual dtype of a training step
        s32, t32 = s.float(), t.float()
        if kind == "skew_kl":
            want32 = distillm_skewed_forward_kl(s32.double(), t32.double(), labels, lam) - entropy_mean(t32, labels)
        else:
            want32 = distillm_skewed_reverse_kl(s32.double(), t32.double(), labels, lam)
        assert_close(tgtfast.distill_loss(s32, t32, kind, alpha=lam, **kw), want32, 2e-6, 1e-5, "float32 value")


# --------------------------------------------------------------------------------------------------------------
# ABKD: the alpha-beta divergence
# --------------------------------------------------------------------------------------------------------------


def abkd_ab_div(logits_, teacher_logits, labels, alpha, beta, acc=torch.float64):
    # ghwang-s/abkd, distillation_llm/distillm/losses.py, ab_div
    teacher_probs = F.softmax(teacher_logits, dim=-1, dtype=acc)
    student_probs = F.softmax(logits_, dim=-1, dtype=acc)
    inf_mask = torch.isinf(logits_) | torch.isinf(teacher_logits)
    if alpha == 0 and beta == 0:
        log_diff = torch.masked_fill(torch.log(student_probs) - torch.log(teacher_probs), inf_mask, 0)
        divergence = 0.5 * torch.sum(log_diff**2, dim=-1)
    elif alpha == 0:
        q_beta, p_beta = torch.pow(student_probs, beta), torch.pow(teacher_probs, beta)
        ratio = q_beta / p_beta
        ratio = torch.masked_fill(ratio, torch.isnan(ratio), 0)
        divergence = (1 / beta) * torch.sum(q_beta * torch.log(ratio) - q_beta + p_beta, dim=-1)
    elif beta == 0:
        p_alpha = torch.masked_fill(torch.pow(teacher_probs, alpha), inf_mask, 0)
        q_alpha = torch.masked_fill(torch.pow(student_probs, alpha), inf_mask, 0)
        ratio = p_alpha / q_alpha
        ratio = torch.masked_fill(ratio, torch.isnan(ratio), 0)
        divergence = (1 / alpha) * torch.sum(p_alpha * torch.log(ratio) - p_alpha + q_alpha, dim=-1)
    elif alpha + beta == 0:
        p_alpha = torch.masked_fill(torch.pow(teacher_probs, alpha), inf_mask, 0)
        q_alpha = torch.masked_fill(torch.pow(student_probs, alpha), inf_mask, 0)
        divergence = torch.sum((1 / alpha) * (torch.log(q_alpha / p_alpha) + (p_alpha / q_alpha) - 1), dim=-1)
    else:
        divergence = torch.masked_fill(torch.pow(teacher_probs, alpha) * torch.pow(student_probs, beta), inf_mask, 0)
        divergence = divergence - torch.masked_fill(alpha / (alpha + beta) * torch.pow(teacher_probs, alpha + beta),
                                                    inf_mask, 0)
        divergence = divergence - torch.masked_fill(beta / (alpha + beta) * torch.pow(student_probs, alpha + beta),
                                                    inf_mask, 0)
        divergence = -torch.sum(divergence, dim=-1) / (alpha * beta)
    mask = (labels != -100).int()
    return torch.sum(divergence * mask.float()) / torch.sum(mask.float())


def _ab_factor(alpha, beta):
    """ABKD's code over tgtfast (Cichocki's limits): its limit branches divide by alpha (beta) once, not squared."""
    if alpha != 0 and beta != 0 and alpha + beta != 0:
        return 1.0
    if alpha == 0 and beta == 0:
        return 1.0
    return beta if alpha == 0 else alpha


AB_PARAMS = [(0.5, 0.5), (0.2, 0.7), (1.0, 0.5), (-0.3, 0.8), (1.5, -0.5), (2.0, 1.0),  # general
             (1.0, 0.0), (0.5, 0.0), (2.0, 0.0), (0.0, 1.0), (0.0, 0.6), (0.7, -0.7), (-0.4, 0.4), (0.0, 0.0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha, beta", AB_PARAMS)
def test_abkd(backend, alpha, beta):
    s, t = logits(2, 7, 40, dtype=torch.float64), logits(2, 7, 40, dtype=torch.float64)
    labels = _labels((2, 7), 40)
    factor = _ab_factor(alpha, beta)
    want, want_grad = value_and_grad(lambda x: abkd_ab_div(x, t, labels, alpha, beta), s, 2.0)
    got, got_grad = value_and_grad(lambda x: factor * tgtfast.distill_loss(
        x, t, "ab_divergence", alpha=alpha, beta=beta, target=labels, backend=backend), s, 2.0)
    assert_close(got, want, 1e-12, 1e-9, "value")
    assert_close(got_grad, want_grad, 1e-12, 1e-8, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha, beta, near", [(0.5, 0.0, (0.5, 1e-6)), (0.0, 0.6, (1e-6, 0.6)),
                                               (0.7, -0.7, (0.7, -0.7 + 1e-6)), (0.0, 0.0, (1e-5, 1e-5))])
def test_ab_limits_are_continuous(backend, alpha, beta, near):
    """tgtfast's limit forms are the limits of its general form (float64, a step 1e-6 off); (1, 0) is forward KL and
    (0, 1) reverse KL."""
    s, t = logits(3, 30, dtype=torch.float64), logits(3, 30, dtype=torch.float64)
    at = tgtfast.distill_loss(s, t, "ab_divergence", alpha=alpha, beta=beta, backend=backend)
    off = tgtfast.distill_loss(s, t, "ab_divergence", alpha=near[0], beta=near[1], backend=backend)
    assert_close(off, at, 1e-6, 1e-4, "limit")
    assert_close(tgtfast.distill_loss(s, t, "ab_divergence", alpha=1.0, beta=0.0, backend=backend),
                 tgtfast.distill_loss(s, t, "forward_kl", backend=backend), 1e-12, 1e-10, "(1, 0)")
    assert_close(tgtfast.distill_loss(s, t, "ab_divergence", alpha=0.0, beta=1.0, backend=backend),
                 tgtfast.distill_loss(s, t, "reverse_kl", backend=backend), 1e-12, 1e-10, "(0, 1)")
