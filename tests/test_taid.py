"""TAIDSchedule (tgtfast/losses/taid.py): the linear floor, monotone and bounded adaptive steps, the momentum
recursion against hand-written replicas (the paper's update and the authors' code's ``TAID.update_t``), the
state_dict round trip and the argument checks."""

import json
import math
import random

import numpy as np
import pytest
import torch

import tgtfast
from tgtfast.losses.taid import TAIDSchedule

# A fixed loss sequence: falling fast, stalling, rising once, falling again.
LOSSES = [4.0, 3.2, 2.9, 2.85, 2.84, 2.9, 2.6, 2.5, 2.45, 2.44, 2.44, 2.3, 2.2, 2.25, 2.1, 2.0]


def paper_replica(losses, total_steps, t_start, t_end, alpha, beta, disable_adaptive=False, eps=1e-15):
    """Section 3.2 of the TAID paper, written out: t after each step and the momentum after each step."""
    t, m, prev, ts, ms = t_start, 0.0, None, [], []
    for n, j in enumerate(losses, start=1):
        t_lin = t_start + (t_end - t_start) * min(n, total_steps) / total_steps
        dt = 0.0
        if prev is not None:
            m = beta * m + (1 - beta) * (prev - j) / (prev + eps)
            dt = alpha * (1 / (1 + math.exp(-m))) * (1 - t)
        t = t_lin if disable_adaptive else min(t_end, max(t_lin, t + dt))
        prev = j
        ts.append(t)
        ms.append(m)
    return ts, ms


class CodeReplica:
    """The authors' ``TAID.update_t`` (github SakanaAI/TAID, src/distil_losses/taid.py), float32 tensors as there,
    on the CPU, called with Lightning's ``global_step`` (steps already taken) as the training loop does."""

    def __init__(self, t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99, disable_adaptive=False):
        self.t_start, self.t_end, self.alpha, self.beta = t_start, t_end, alpha, beta
        self.disable_adaptive = disable_adaptive
        self.t = torch.tensor(t_start, dtype=torch.float32)
        self.prev_loss = torch.tensor(float("inf"), dtype=torch.float32)
        self.momentum = torch.zeros([], dtype=torch.float32)

    def update_t(self, loss, global_step, num_train_steps):
        if torch.isinf(self.prev_loss):
            self.prev_loss = loss
            return
        relative_change = (self.prev_loss - loss) / (self.prev_loss + 1e-15)
        self.momentum = self.beta * self.momentum + (1 - self.beta) * relative_change
        adaptive_delta = torch.sigmoid(self.momentum)
        progress = global_step / num_train_steps
        t_target = self.t_start + (self.t_end - self.t_start) * progress
        delta_t = self.alpha * adaptive_delta * (1 - self.t)
        t = min(self.t_end, max(t_target, self.t + delta_t)) if not self.disable_adaptive else t_target
        if not isinstance(t, torch.Tensor):
            t = torch.tensor(t, dtype=self.t.dtype)
        self.t = t
        self.prev_loss = loss


def test_defaults_are_the_papers():
    s = TAIDSchedule(100)
    assert (s.t_start, s.t_end, s.alpha, s.beta, s.disable_adaptive) == (0.4, 1.0, 5e-4, 0.99, False)
    assert s.t == 0.4 and s.num_steps == 0 and s.momentum == 0.0 and isinstance(s.t, float)


@pytest.mark.parametrize("t_start, t_end, n_total", [(0.4, 1.0, 10), (0.2, 0.9, 7), (0.0, 1.0, 1), (0.5, 0.5, 3)])
def test_linear_floor(t_start, t_end, n_total):
    """disable_adaptive follows t_start + (t_end - t_start) n / N exactly, reaches t_end at N and stays there; with
    alpha = 0 the adaptive schedule is the same line."""
    plain = TAIDSchedule(n_total, t_start=t_start, t_end=t_end, disable_adaptive=True)
    still = TAIDSchedule(n_total, t_start=t_start, t_end=t_end, alpha=0.0)
    for n in range(1, n_total + 4):
        loss = 3.0 / n
        expected = t_start + (t_end - t_start) * min(n, n_total) / n_total
        assert plain.step(loss) == pytest.approx(expected, abs=1e-15)
        assert still.step(loss) == pytest.approx(expected, abs=1e-15)
        assert plain.floor(n) == pytest.approx(expected, abs=1e-15)
    assert plain.t == t_end and still.t == t_end


def test_adaptive_steps_monotone_bounded():
    """t never decreases, never exceeds t_end, never falls below the floor, whatever the losses do."""
    rng = random.Random(0)
    for trial in range(40):
        n_total = rng.choice([1, 5, 50, 400])
        t_start = rng.choice([0.0, 0.2, 0.4, 0.99])
        t_end = rng.choice([t_start, min(1.0, t_start + 0.3), 1.0])
        s = TAIDSchedule(n_total, t_start=t_start, t_end=t_end, alpha=rng.choice([5e-4, 0.1, 1.0]),
                         beta=rng.choice([0.0, 0.9, 0.99, 1.0]))
        prev_t = s.t
        loss = rng.uniform(0.1, 10.0)
        for n in range(1, 80):
            kind = trial % 4
            loss = (loss * rng.uniform(0.3, 0.99) if kind == 0 else loss * rng.uniform(1.01, 3.0) if kind == 1
                    else rng.uniform(0.0, 5.0) if kind == 2 else loss)
            t = s.step(loss)
            assert prev_t <= t <= t_end
            assert t >= s.floor(n) - 1e-15
            prev_t = t
        assert s.t == t_end or n_total > 79


def test_falling_loss_moves_faster_than_a_rising_one():
    fall, rise = TAIDSchedule(10_000, alpha=0.01), TAIDSchedule(10_000, alpha=0.01)
    for n in range(50):
        fall.step(10.0 * 0.9**n)
        rise.step(1.0 * 1.1**n)
    assert fall.momentum > 0 > rise.momentum
    assert fall.t > rise.t > fall.floor(50)


@pytest.mark.parametrize("disable_adaptive", [False, True])
@pytest.mark.parametrize("alpha, beta, n_total", [(5e-4, 0.99, 20), (0.05, 0.9, 1000), (0.3, 0.5, 12)])
def test_recursion_matches_the_paper(alpha, beta, n_total, disable_adaptive):
    ts, ms = paper_replica(LOSSES, n_total, 0.2, 1.0, alpha, beta, disable_adaptive)
    s = TAIDSchedule(n_total, t_start=0.2, t_end=1.0, alpha=alpha, beta=beta, disable_adaptive=disable_adaptive)
    for loss, t, m in zip(LOSSES, ts, ms):
        assert s.step(loss) == pytest.approx(t, rel=0, abs=1e-15)
        assert s.momentum == pytest.approx(m, rel=1e-15, abs=1e-18)
        assert s.t == pytest.approx(t, rel=0, abs=1e-15)


def test_recursion_matches_the_authors_code():
    """Same momentum as the code's update_t, call for call (float32 there); with the floor out of the way the same t;
    the linear schedule is one step ahead of the code's (its floor uses the steps already taken)."""
    # Adaptive, floor far below: t and momentum agree to float32 precision.
    code, ours = CodeReplica(alpha=0.05, beta=0.9), TAIDSchedule(10**9, alpha=0.05, beta=0.9)
    for step, loss in enumerate(LOSSES):
        code.update_t(torch.tensor(loss, dtype=torch.float32), global_step=step, num_train_steps=10**9)
        ours.step(torch.tensor(loss, dtype=torch.float32))
        assert ours.momentum == pytest.approx(float(code.momentum), rel=1e-5, abs=1e-7)
        assert ours.t == pytest.approx(float(code.t), rel=1e-6)
    # Linear schedule: ours after n steps is the code's after n + 1 calls.
    n_total = 8
    code, ours = CodeReplica(t_start=0.2, disable_adaptive=True), TAIDSchedule(n_total, t_start=0.2,
                                                                              disable_adaptive=True)
    code_ts, our_ts = [], []
    for step, loss in enumerate(LOSSES[: n_total + 1]):
        code.update_t(torch.tensor(loss), global_step=step, num_train_steps=n_total)
        code_ts.append(float(code.t))
        our_ts.append(ours.step(loss))
    assert code_ts[0] == pytest.approx(0.2)  # the code's first call only records the loss
    np.testing.assert_allclose(our_ts[:-1], code_ts[1:], rtol=1e-6)
    assert our_ts[n_total - 1] == 1.0 and code_ts[n_total - 1] < 1.0


def test_step_takes_numbers_and_scalar_tensors():
    a, b, c = TAIDSchedule(10, alpha=0.1), TAIDSchedule(10, alpha=0.1), TAIDSchedule(10, alpha=0.1)
    for loss in (3.0, 2.0, 1.5):
        x = torch.tensor(loss, requires_grad=True) * 1.0  # a graph node: read without gradient
        assert a.step(loss) == b.step(x) == c.step(np.float32(loss))
    assert b.step(torch.tensor([1.25])) == a.step(1.25)  # one-element tensor
    assert a.step(1) == b.step(torch.tensor(1, dtype=torch.int64))


@pytest.mark.parametrize("bad, exc, text", [
    (float("nan"), ValueError, "loss must be finite"),
    (float("inf"), ValueError, "loss must be finite"),
    (torch.tensor(float("nan")), ValueError, "loss must be finite"),
    (torch.ones(2), ValueError, "loss must be a scalar"),
    (True, TypeError, "loss must be a real number"),
    ("1.0", TypeError, "loss must be a real number"),
    (None, TypeError, "loss must be a real number"),
])
def test_bad_loss(bad, exc, text):
    s = TAIDSchedule(10)
    s.step(2.0)
    before = s.state_dict()
    with pytest.raises(exc, match=text):
        s.step(bad)
    assert s.state_dict() == before  # a refused step changes nothing


def test_state_dict_round_trip():
    losses = LOSSES * 2
    whole = TAIDSchedule(25, t_start=0.2, alpha=0.02, beta=0.9)
    first = TAIDSchedule(25, t_start=0.2, alpha=0.02, beta=0.9)
    for loss in losses[:9]:
        whole.step(loss)
        first.step(loss)
    state = json.loads(json.dumps(first.state_dict()))  # plain numbers: JSON survives
    assert all(v is None or isinstance(v, (int, float, bool)) for v in state.values())
    resumed = TAIDSchedule(3)  # other hyper-parameters: the state dict brings its own
    resumed.load_state_dict(state)
    assert resumed.state_dict() == first.state_dict()
    for loss in losses[9:]:
        assert resumed.step(loss) == whole.step(loss)
    assert resumed.state_dict() == whole.state_dict()
    fresh = TAIDSchedule(7, t_start=0.3)
    other = TAIDSchedule(1)
    other.load_state_dict(fresh.state_dict())
    assert other.state_dict() == fresh.state_dict() and other.state_dict()["prev_loss"] is None
    assert "t=1 after 32 steps" in repr(whole)


@pytest.mark.parametrize("kwargs, exc, text", [
    (dict(total_steps=0), ValueError, "total_steps must be >= 1"),
    (dict(total_steps=-5), ValueError, "total_steps"),
    (dict(total_steps=2.5), TypeError, "total_steps must be an int"),
    (dict(total_steps=True), TypeError, "total_steps"),
    (dict(total_steps=10, t_start=-0.1), ValueError, "t_start must be in"),
    (dict(total_steps=10, t_start=1.5), ValueError, "t_start must be in"),
    (dict(total_steps=10, t_end=1.01), ValueError, "t_end must be in"),
    (dict(total_steps=10, t_end=-1.0), ValueError, "t_end must be in"),
    (dict(total_steps=10, t_start=float("nan")), ValueError, "t_start"),
    (dict(total_steps=10, t_start=0.8, t_end=0.5), ValueError, "t_start must be <= t_end"),
    (dict(total_steps=10, alpha=-1e-3), ValueError, "alpha must be in"),
    (dict(total_steps=10, alpha=2.0), ValueError, "alpha must be in"),
    (dict(total_steps=10, beta=1.5), ValueError, "beta must be in"),
    (dict(total_steps=10, beta="0.9"), TypeError, "beta must be a real number"),
    (dict(total_steps=10, disable_adaptive=1), TypeError, "disable_adaptive must be a bool"),
])
def test_bad_arguments(kwargs, exc, text):
    with pytest.raises(exc, match=text):
        TAIDSchedule(**kwargs)


def test_bad_state_dict():
    s = TAIDSchedule(10)
    s.step(1.0)
    good = s.state_dict()
    cases = [
        ({k: v for k, v in good.items() if k != "momentum"}, ValueError, "misses"),
        (dict(good, extra=1), ValueError, "unknown entries"),
        (dict(good, t=1.5), ValueError, r"state_dict\['t'\]"),
        (dict(good, t=0.1), ValueError, r"state_dict\['t'\]"),  # below t_start
        (dict(good, num_steps=-1), ValueError, "num_steps"),
        (dict(good, prev_loss=None), ValueError, "prev_loss"),
        (dict(good, prev_loss=float("nan")), ValueError, "prev_loss"),
        (dict(good, t_start=0.9, t_end=0.5), ValueError, "t_start must be <= t_end"),
        ([1, 2], TypeError, "state_dict must be a dict"),
    ]
    for bad, exc, text in cases:
        with pytest.raises(exc, match=text):
            s.load_state_dict(bad)
    assert s.state_dict() == good


@pytest.mark.skipif(not hasattr(tgtfast, "TAIDLoss"), reason="tgtfast.TAIDLoss not present")
def test_taid_loss_reads_the_schedule():
    """TAIDLoss(schedule=...) computes distill_loss(..., "taid", t=schedule.t) at the schedule's current t."""
    s = torch.randn(6, 11, dtype=torch.float64)
    z = torch.randn(6, 11, dtype=torch.float64)
    schedule = TAIDSchedule(4, t_start=0.2)
    loss_fn = tgtfast.TAIDLoss(schedule=schedule, backend="reference")
    for _ in range(3):
        got = loss_fn(s, z)
        want = tgtfast.reference.distill_loss(s, z, "taid", param_a=schedule.t)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        schedule.step(got)
