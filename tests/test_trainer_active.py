"""TGTTrainer with ``active_pool``: candidates are made without labels, the student and the teacher's correctness
estimated from the student's margin choose which ones the teacher labels, and only those reach the labeler; the
teacher's queries are counted."""

import copy
import os
import sys

import pytest
import torch
from torch import nn

from tgtfast import reference
from tgtfast.imperfect import MonotoneCurve, select_queries, student_informativeness
from tgtfast.imperfect.reliability import teacher_scores
from tgtfast.train import TGTConfig, TGTTrainer, noise_seed
from tgtfast.train.data import StepPlan

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_trainer import D, K, _one_thread, student, teacher  # noqa: E402,F401  (models and the one-thread fixture)


class Counting(nn.Module):
    """A labeler that records the inputs of every call."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = []

    def forward(self, x):
        self.calls.append(x.detach().clone())
        return self.inner(x)


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g), torch.randint(0, K, (n,), generator=g)


def val_data():
    """Validation rows where the teacher is right on the larger inputs (where the students' margins are larger
    too) and right by chance on the others: a correctness curve that is not flat."""
    x, y = data(100, seed=9)
    x = x * torch.linspace(0.2, 3.0, 100).unsqueeze(1)
    with torch.no_grad():
        y[50:] = teacher()[0](x[50:]).argmax(-1)
    return x, y


def run(exploration, *, steps=2, pool=3, S=2, bs=8, refit=10, s=None):
    lab, dec, enc = teacher()
    counting = Counting(lab)
    cfg = TGTConfig(exploration=exploration, samples_per_example=S, active_pool=pool, batch_size=bs,
                    max_steps=steps, log_every=1, sigma=0.5, reliability_bins=4, active_refit_every=refit,
                    progress=False, plot=False)
    s = student() if s is None else s
    tr = TGTTrainer(s, counting, decoder=dec, encoder=enc, config=cfg)
    val = val_data()
    hist = tr.fit(data(16, seed=3), val=val)
    return tr, counting.calls, hist


def test_labeler_sees_exactly_the_selected_candidates():
    s0 = student()
    init = copy.deepcopy(s0)
    tr, calls, hist = run("input", steps=1, s=s0)
    lab = tr.labeler.inner
    x, _ = data(16, seed=3)
    xv, yv = val_data()
    # before the step: the shape probe on 2 examples, the training set labelled once (the cache), the validation
    # rows once (correctness); after it, the evaluation on val
    assert [c.shape[0] for c in calls] == [2, 16, 100, 16, 100]
    assert torch.equal(calls[1], x) and torch.equal(calls[2], xv)
    # the step, by hand: 8 examples x 2 samples x pool 3 candidates = x + 0.5 * noise, no label asked
    c = tr.config
    _, batches = StepPlan(c, 16).batches(0)
    (micro, idx, start, _), = batches
    xb = x[idx].repeat_interleave(6, dim=0)
    cand = xb + 0.5 * reference.latent_noise(tuple(xb.shape), noise_seed(c.seed, 0, micro, 0), start * 6 * D)
    with torch.no_grad():
        right = (lab(xv).argmax(-1) == yv).numpy()
        curve = MonotoneCurve.fit(teacher_scores(init(xv), "margin").numpy(), right, method="binned", bins=4)
        sc = init(cand)
    q = curve(teacher_scores(sc, "margin"))
    g = torch.Generator().manual_seed(noise_seed(c.seed, 0, micro, 1))
    keep = select_queries(student_informativeness(sc), q, 16, generator=g)
    torch.testing.assert_close(calls[3], cand[keep], rtol=1e-5, atol=1e-6)
    assert hist.train[0]["teacher_queries"] == 16  # only the kept rows
    assert hist.teacher_queries == 16 + 16  # plus the cached training set


@pytest.mark.parametrize("exploration", ["random", "gradient", "input"])
def test_active_runs_are_reproducible_and_count_the_queries(exploration):
    a, calls_a, hist_a = run(exploration, refit=1)
    b, calls_b, hist_b = run(exploration, refit=1)
    for pa, pb in zip(a.student.parameters(), b.student.parameters()):
        assert torch.equal(pa, pb)
    assert len(calls_a) == len(calls_b) and all(torch.equal(u, v) for u, v in zip(calls_a, calls_b))
    step_calls = [c.shape[0] for c in calls_a[3:-1]]  # after probe, cache, val rows; before evaluation
    ascent = [48] * a.config.explore_steps if exploration == "gradient" else []
    assert step_calls == (ascent + [16]) * 2  # per step: the ascent labels every candidate, then the 16 kept
    assert [r["teacher_queries"] for r in hist_a.train] == [sum(ascent) + 16] * 2
    assert hist_a.teacher_queries == 16 + 2 * (sum(ascent) + 16)


def test_without_active_selection_every_sample_is_labelled_and_counted():
    lab, dec, enc = teacher()
    counting = Counting(lab)
    cfg = TGTConfig(exploration="input", samples_per_example=3, batch_size=8, max_steps=2, log_every=1,
                    cache_teacher=False, progress=False, plot=False)
    hist = TGTTrainer(student(), counting, decoder=dec, encoder=enc, config=cfg).fit(data(16, seed=3))
    # no cache: per step the 8 training inputs and their 24 noisy copies
    assert [c.shape[0] for c in counting.calls if c.shape[0] != 2] == [8, 24] * 2
    assert [r["teacher_queries"] for r in hist.train] == [32, 32] and hist.teacher_queries == 64


def test_active_correctness_needs_enough_validation_rows():
    lab, dec, enc = teacher()
    cfg = TGTConfig(exploration="random", active_pool=2, batch_size=8, max_steps=1, reliability_bins=4,
                    progress=False, plot=False)
    tr = TGTTrainer(student(), lab, decoder=dec, encoder=enc, config=cfg)
    with pytest.raises(ValueError, match="100"):
        tr.fit(data(16, seed=3), val=data(60, seed=9))
    with pytest.raises(ValueError, match="val="):
        tr.fit(data(16, seed=3))


class Stop(Exception):
    pass


def test_resume_continues_with_the_saved_correctness_curve(tmp_path):
    def fit(out, resume=False, stop_at=None):
        lab, dec, enc = teacher()
        cfg = TGTConfig(exploration="random", samples_per_example=2, active_pool=3, batch_size=8, max_steps=4,
                        reliability_bins=4, active_refit_every=3, lr=0.1, out_dir=str(out), checkpoint_every=2,
                        resume=resume, progress=False, plot=False)
        s = student()
        tr = TGTTrainer(s, lab, decoder=dec, encoder=enc, config=cfg)

        def stop(trainer, record):
            if record["step"] == stop_at:
                raise Stop

        try:
            tr.fit(data(16, seed=3), val=val_data(), callback=stop)
        except Stop:
            pass
        return s, tr

    straight, _ = fit(tmp_path / "a")
    fit(tmp_path / "b", stop_at=2)  # checkpointed after step 2
    # steps 1-2 used the curve fitted before step 1; the resumed run reads it from the checkpoint and refits
    # before step 4 (index 3) like the straight run (fitting it afresh on resuming would choose other candidates)
    resumed, tr = fit(tmp_path / "b", resume=True)
    assert tr._correctness.fitted_at == 3 and len(set(tr._correctness.curve.values.tolist())) > 1
    for pa, pb in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(pa, pb)
