"""The loss drop-ins of tgtfast.integrations against the functions they replace.

* :func:`tgtfast.integrations.trl.generalized_jsd_loss` against TRL's ``GKDTrainer.generalized_jsd_loss`` (the
  installed library, and its formula as tests/test_divergence_peers.py writes it, so that the parity is checked
  without trl too): float64, value, shape and gradients wrt both logits, every reduction, beta 0 / 0.5 / 1,
  temperatures 1 and 2, with and without ``-100`` labels, ``num_items_in_batch``.
* :class:`tgtfast.integrations.liger.FusedLinearJSDLoss` against liger-kernel's ``LigerFusedLinearJSDLoss``
  (``compiled=False``, and once compiled): loss weights, beta, ignore_index, temperature, biases, chunk sizes, the
  soft / hard parts, a teacher with a larger vocabulary. Liger computes its cross-entropy in float32 and returns a
  float32 loss even for float64 inputs, so the exact float64 check is against the formula of Liger's own tests
  (tests/test_divergence_peers.py), the library check at float32 precision.
"""

import subprocess
import sys
import warnings

import pytest
import torch

from test_divergence_peers import _one_thread, liger_fused_linear_jsd_formula, trl_generalized_jsd  # noqa: F401
from tgtfast.integrations.liger import FusedLinearJSDLoss, LigerFusedLinearJSDLoss, liger_fused_linear_jsd
from tgtfast.integrations.trl import generalized_jsd_loss

REDUCTIONS = ("batchmean", "sum", "mean", "none")


def _trl_library():
    warnings.filterwarnings("ignore", message=".*trl.experimental.*")
    return pytest.importorskip("trl.experimental.gkd", reason="trl not installed").GKDTrainer.generalized_jsd_loss


def _trl_peer(kind):
    return _trl_library() if kind == "library" else trl_generalized_jsd


def _close(actual, expected, atol, rtol, what):
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(), atol=atol, rtol=rtol,
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


def _logits(shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 2.0).to(dtype)


def _labels(lead, vocab, seed, all_ignored=False):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, lead, generator=g)
    labels[torch.rand(lead, generator=g) < 0.3] = -100
    labels.view(-1)[0] = 1
    if all_ignored:
        labels[:] = -100
    return labels


def _value_and_grads(fn, s, t):
    """fn(s, t) and the gradients of a random projection of it wrt fresh leaf copies of both logits."""
    s, t = s.detach().clone().requires_grad_(True), t.detach().clone().requires_grad_(True)
    out = fn(s, t)
    g = torch.Generator().manual_seed(7)
    probe = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    (out * probe).sum().backward()
    return out.detach(), s.grad, t.grad


def _trl_compare(peer, shape, labels, atol=1e-12, rtol=1e-10, **kw):
    s, t = _logits(shape, 1), _logits(shape, 2)
    want = _value_and_grads(lambda a, b: peer(a, b, labels, **kw), s, t)
    got = _value_and_grads(lambda a, b: generalized_jsd_loss(a, b, labels, **kw), s, t)
    assert got[0].shape == want[0].shape and got[0].dtype == want[0].dtype
    for name, a, b in zip(("value", "student grad", "teacher grad"), got, want):
        _close(a, b, atol, rtol, f"{name} {kw}")


# --------------------------------------------------------------------------------------------------------------
# TRL
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("peer", ["library", "formula"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("use_labels", [False, True], ids=["nolabels", "labels"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.1])
def test_trl_parity(peer, reduction, use_labels, beta):
    shape = (3, 5, 13)
    labels = _labels(shape[:-1], shape[-1], 3) if use_labels else None
    for temperature in (1.0, 2.0):
        _trl_compare(_trl_peer(peer), shape, labels, beta=beta, temperature=temperature, reduction=reduction)


@pytest.mark.parametrize("peer", ["library", "formula"])
@pytest.mark.parametrize("num_items", [7, 2.5, torch.tensor(31)], ids=["int", "float", "tensor"])
def test_trl_num_items_in_batch(peer, num_items):
    """The sum over positions kept divided by num_items_in_batch, whatever the reduction says."""
    labels = _labels((4, 6), 11, 4)
    for reduction in REDUCTIONS:
        for lab in (None, labels):
            for beta in (0.0, 0.5, 1.0):
                _trl_compare(_trl_peer(peer), (4, 6, 11), lab, beta=beta, temperature=1.5, reduction=reduction,
                             num_items_in_batch=num_items)


@pytest.mark.parametrize("peer", ["library", "formula"])
def test_trl_two_dim_logits_and_defaults(peer):
    """[N, V] logits (batchmean divides by N) and the default arguments."""
    labels = _labels((9,), 17, 5)
    for lab in (None, labels):
        for reduction in REDUCTIONS:
            _trl_compare(_trl_peer(peer), (9, 17), lab, reduction=reduction)
    _trl_compare(_trl_peer(peer), (2, 3, 5), None)


def test_trl_all_ignored():
    """Every position ignored: batchmean / sum 0, none empty [0, V]; mean is 0 where TRL gives NaN (a mean of
    nothing)."""
    peer = trl_generalized_jsd
    s, t = _logits((2, 3, 7), 1), _logits((2, 3, 7), 2)
    labels = torch.full((2, 3), -100)
    for reduction in ("batchmean", "sum", "none"):
        _trl_compare(peer, (2, 3, 7), labels, reduction=reduction)
    assert generalized_jsd_loss(s, t, labels, reduction="none").shape == (0, 7)
    assert torch.isnan(peer(s, t, labels, reduction="mean"))
    s = s.requires_grad_(True)
    out = generalized_jsd_loss(s, t, labels, reduction="mean")
    out.backward()
    assert out.item() == 0.0 and s.grad.abs().sum().item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trl_low_precision(dtype):
    """float32 / bfloat16 logits against TRL in float64: the reduced loss is float32 and at least as close to the
    float64 value as TRL in the logits' dtype is; "none" keeps the logits' dtype."""
    shape = (2, 8, 101)
    s, t = _logits(shape, 1, dtype), _logits(shape, 2, dtype)
    labels = _labels(shape[:-1], shape[-1], 3)
    for reduction in ("batchmean", "mean", "sum"):
        truth = trl_generalized_jsd(s.double(), t.double(), labels, 0.5, 2.0, reduction)
        same_dtype = trl_generalized_jsd(s, t, labels, 0.5, 2.0, reduction).double()
        got = generalized_jsd_loss(s, t, labels, 0.5, 2.0, reduction)
        assert got.dtype == torch.float32
        assert abs(got.item() - truth.item()) <= 2 * abs(same_dtype.item() - truth.item()) + 1e-6 * abs(truth.item())
    none = generalized_jsd_loss(s, t, labels, 0.5, 2.0, "none")
    assert none.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    _close(none, trl_generalized_jsd(s.double(), t.double(), labels, 0.5, 2.0, "none"), tol, tol, "none")


def test_trl_as_gkd_trainer_loss():
    """The static method of a GKDTrainer subclass, as the module docstring shows."""
    gkd = pytest.importorskip("trl.experimental.gkd", reason="trl not installed")

    class FastGKD(gkd.GKDTrainer):
        generalized_jsd_loss = staticmethod(generalized_jsd_loss)

    s, t = _logits((2, 4, 9), 1), _logits((2, 4, 9), 2)
    _close(FastGKD.generalized_jsd_loss(s, t, beta=0.3), gkd.GKDTrainer.generalized_jsd_loss(s, t, beta=0.3),
           1e-12, 1e-10, "subclass")


def test_trl_bad_input():
    s, t = _logits((2, 3, 5), 1), _logits((2, 3, 5), 2)
    with pytest.raises(ValueError, match="teacher_logits shape"):
        generalized_jsd_loss(s, t[..., :4])
    with pytest.raises(ValueError, match="teacher_logits shape"):
        generalized_jsd_loss(s, t[:1])
    with pytest.raises(ValueError, match="reduction"):
        generalized_jsd_loss(s, t, reduction="avg")
    for beta in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="beta"):
            generalized_jsd_loss(s, t, beta=beta)
    with pytest.raises(ValueError, match="labels shape"):
        generalized_jsd_loss(s, t, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="labels"):
        generalized_jsd_loss(s, t, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="temperature"):
        generalized_jsd_loss(s, t, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        generalized_jsd_loss(s, t, reduction="none", temperature=-1.0)
    with pytest.raises(TypeError, match="student_logits"):
        generalized_jsd_loss(s.tolist(), t)
    with pytest.raises(ValueError, match="student_logits"):
        generalized_jsd_loss(s[0, 0], t[0, 0])
    with pytest.raises(ValueError, match="num_items_in_batch"):
        generalized_jsd_loss(s, t, num_items_in_batch=0)


# --------------------------------------------------------------------------------------------------------------
# Liger-Kernel
# --------------------------------------------------------------------------------------------------------------


def _liger_case(n, h, v, vt=None, bias=False, dtype=torch.float64, seed=0, ignore_index=-100):
    """Inputs as Liger's test_correctness draws them (uniform; teacher hidden size 2 H); labels with ignored rows."""
    g = torch.Generator().manual_seed(seed)
    vt = v if vt is None else vt

    def rand(*shape):
        return torch.rand(shape, generator=g, dtype=torch.float64).to(dtype)

    x = dict(student_input=rand(n, h), student_weight=rand(v, h), teacher_input=rand(n, 2 * h),
             teacher_weight=rand(vt, 2 * h), student_bias=rand(v) if bias else None,
             teacher_bias=rand(vt) if bias else None)
    target = torch.randint(0, v, (n,), generator=g)
    target[torch.rand(n, generator=g) < 0.25] = ignore_index
    target[0] = 1
    return x, target


def _liger_run(fn, x, target, grad_scale=1.7):
    """fn's outputs (detached) and the gradients of grad_scale * loss wrt the student's tensors."""
    leaves = {k: None if v is None else v.detach().clone().requires_grad_(k.startswith("student"))
              for k, v in x.items()}
    out = fn(leaves["student_input"], leaves["student_weight"], leaves["teacher_input"], leaves["teacher_weight"],
             target, leaves["student_bias"], leaves["teacher_bias"])
    outs = out if isinstance(out, tuple) else (out,)
    (outs[0] * grad_scale).backward()
    grads = {k: v.grad for k, v in leaves.items() if v is not None and v.requires_grad}
    return [o.detach() for o in outs], grads


def _liger_compare(want, got, atol, rtol):
    (want_out, want_grads), (got_out, got_grads) = want, got
    assert len(want_out) == len(got_out)
    for i, (a, b) in enumerate(zip(got_out, want_out)):
        _close(a, b, atol, rtol, ("loss", "soft", "hard")[i])
    assert set(got_grads) == set(want_grads)
    for k in want_grads:
        assert got_grads[k].dtype == want_grads[k].dtype
        _close(got_grads[k], want_grads[k], atol, rtol, f"grad {k}")


LIGER_OPTIONS = [  # weight_hard_loss, weight_soft_loss, beta, ignore_index, temperature
    (0.5, 0.5, 0.5, -100, 1.0),
    (0.0, 1.0, 0.8, -100, 2.0),
    (1.0, 0.0, 0.2, 42, 0.5),
    (0.3, 0.7, 0.0, -100, 1.0),
    (0.3, 0.7, 1.0, 42, 2.0),
]


@pytest.mark.parametrize("weight_hard_loss, weight_soft_loss, beta, ignore_index, temperature", LIGER_OPTIONS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("chunk_size", [8, 1024])
@pytest.mark.parametrize("parts", [False, True], ids=["loss", "parts"])
def test_liger_library(weight_hard_loss, weight_soft_loss, beta, ignore_index, temperature, bias, chunk_size,
                       parts):
    chunked = pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel not installed")
    options = dict(weight_hard_loss=weight_hard_loss, weight_soft_loss=weight_soft_loss, beta=beta,
                   ignore_index=ignore_index, temperature=temperature, return_soft_hard_loss=parts)
    x, target = _liger_case(45, 16, 60, bias=bias, ignore_index=ignore_index)
    # Liger's cross-entropy is float32 whatever the inputs: float64 inputs, float32 tolerances
    want = _liger_run(chunked.LigerFusedLinearJSDLoss(**options, compiled=False, chunk_size=16), x, target)
    got = _liger_run(FusedLinearJSDLoss(**options, chunk_size=chunk_size), x, target)
    _liger_compare(want, got, 1e-6, 1e-5)


@pytest.mark.parametrize("weight_hard_loss, weight_soft_loss, beta, ignore_index, temperature", LIGER_OPTIONS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_liger_formula_float64(weight_hard_loss, weight_soft_loss, beta, ignore_index, temperature, bias):
    """float64 against the formula of Liger's own tests, value and gradients to float64 precision."""
    x, target = _liger_case(33, 12, 41, bias=bias, ignore_index=ignore_index)
    options = dict(weight_hard_loss=weight_hard_loss, weight_soft_loss=weight_soft_loss, beta=beta,
                   ignore_index=ignore_index, temperature=temperature)

    def formula(si, sw, ti, tw, tgt, sb, tb):
        return liger_fused_linear_jsd_formula(si, sw, ti, tw, tgt, sb, tb, **options)

    want = _liger_run(formula, x, target)
    got = _liger_run(LigerFusedLinearJSDLoss(**options, chunk_size=8), x, target)
    _liger_compare(want, got, 1e-12, 1e-9)


@pytest.mark.parametrize("weight_hard_loss, weight_soft_loss", [(0.0, 1.0), (0.4, 0.6)])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_liger_larger_teacher_vocabulary(weight_hard_loss, weight_soft_loss, bias):
    """A teacher with more classes: Liger pads the student's logits with zeros, its cross-entropy stays over the
    student's classes."""
    chunked = pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel not installed")
    x, target = _liger_case(30, 8, 40, vt=47, bias=bias)
    options = dict(weight_hard_loss=weight_hard_loss, weight_soft_loss=weight_soft_loss, beta=0.3, temperature=1.5,
                   return_soft_hard_loss=True)
    want = _liger_run(chunked.LigerFusedLinearJSDLoss(**options, compiled=False), x, target)
    got = _liger_run(FusedLinearJSDLoss(**options, chunk_size=7), x, target)
    _liger_compare(want, got, 1e-6, 1e-5)


@pytest.mark.slow
def test_liger_library_compiled():
    """Liger's default path (torch.compile of its chunk step, here on the CPU), float32 inputs."""
    chunked = pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel not installed")
    x, target = _liger_case(64, 32, 96, bias=True, dtype=torch.float32)
    options = dict(weight_hard_loss=0.3, weight_soft_loss=0.7, beta=0.4, temperature=2.0, chunk_size=16)
    want = _liger_run(chunked.LigerFusedLinearJSDLoss(**options), x, target)
    got = _liger_run(FusedLinearJSDLoss(**options, compiled=True), x, target)
    _liger_compare(want, got, 1e-5, 1e-4)


def test_liger_functional_and_module_agree():
    """The functional form takes Liger's positional order; the module keeps Liger's attributes."""
    x, target = _liger_case(20, 8, 30, bias=True)
    args = [x["student_input"], x["student_weight"], x["teacher_input"], x["teacher_weight"], target,
            x["student_bias"], x["teacher_bias"]]
    loss_fn = LigerFusedLinearJSDLoss(0.2, 0.8, 0.6, -100, 2.0, False, 4, True)
    assert LigerFusedLinearJSDLoss is FusedLinearJSDLoss
    assert (loss_fn.weight_hard_loss, loss_fn.weight_soft_loss, loss_fn.beta, loss_fn.temperature,
            loss_fn.chunk_size, loss_fn.return_soft_hard_loss) == (0.2, 0.8, 0.6, 2.0, 4, True)
    for a, b in zip(loss_fn(*args), liger_fused_linear_jsd(*args, 0.2, 0.8, 0.6, -100, 2.0, False, 4, True)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    loss, soft, hard = loss_fn(*args)
    _close(loss, 0.2 * hard + 0.8 * soft, 1e-12, 1e-12, "loss = weighted parts")
    assert "beta=0.6" in repr(loss_fn)


def test_liger_bad_input():
    x, target = _liger_case(10, 4, 12)
    args = [x["student_input"], x["student_weight"], x["teacher_input"], x["teacher_weight"], target]
    for kw, match in ((dict(beta=1.2), "beta"), (dict(beta=-0.5), "beta"), (dict(temperature=0.0), "temperature"),
                      (dict(weight_hard_loss=-1.0), "weight_hard_loss"), (dict(weight_soft_loss=-0.1),
                                                                          "weight_soft_loss"),
                      (dict(chunk_size=0), "chunk_size")):
        with pytest.raises(ValueError, match=match):
            FusedLinearJSDLoss(**kw)
    with pytest.raises(TypeError, match="compiled"):
        FusedLinearJSDLoss(compiled="yes")
    with pytest.raises(ValueError, match="teacher_weight has V = 11"):
        FusedLinearJSDLoss()(*args[:3], x["teacher_weight"][:11], target)
    with pytest.raises(ValueError, match="student_weight"):
        FusedLinearJSDLoss()(args[0], x["student_weight"][:, :3], *args[2:])
    with pytest.raises(ValueError, match="target"):
        FusedLinearJSDLoss()(*args[:4], target[:9])
    with pytest.raises(ValueError, match="teacher_hidden"):
        FusedLinearJSDLoss()(args[0], args[1], x["teacher_input"][:9], *args[3:])
    with pytest.raises(ValueError, match="beta"):
        liger_fused_linear_jsd(*args, None, None, 0.5, 0.5, 2.0)


def test_import_is_light():
    """Importing tgtfast.integrations and its loss drop-ins imports none of transformers, trl, liger_kernel."""
    code = ("import sys, tgtfast.integrations as I; assert 'transformers' in dir(I); "
            "from tgtfast.integrations import trl, liger; "
            "bad = [m for m in ('transformers', 'trl', 'liger_kernel', 'accelerate') if m in sys.modules]; "
            "assert not bad, bad; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
