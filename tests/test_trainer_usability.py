"""TGTTrainer as a new user meets it: the default run length and the warning for runs counted in epochs that are
too short, keyword-only teacher parts, batches that always hold labelled examples (a separate unlabelled stream or
``labelled_per_batch``), and calibration (ECE, NLL) in the evaluation."""

import math
import os
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from tgtfast.train import TGTConfig, TGTTrainer
from tgtfast.train.config import DEFAULT_MAX_STEPS, ShortRunWarning
from tgtfast.train.data import StepPlan
from tgtfast.train.streams import MixedPlan, make_plan

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_trainer import K, _one_thread, student, teacher  # noqa: E402,F401  (models and the one-thread fixture)


def data(n, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, K, (n,), generator=g)


class Recording(TGTTrainer):
    """Keeps the labels of every micro-batch the training loop loads (the first load is the shape probe)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.loaded = []

    def _load_batch(self, dataset, collate, indices, device, batch=None, **teacher):
        out = super()._load_batch(dataset, collate, indices, device, batch, **teacher)
        self.loaded.append(out[1].clone())
        return out


def make(cls=TGTTrainer, **cfg):
    lab, dec, enc = teacher()
    base = dict(exploration="random", batch_size=8, progress=False, plot=False)
    base.update(cfg)
    return cls(student(), lab, decoder=dec, encoder=enc, config=TGTConfig(**base))


# ----------------------------------------------------------------------------------------------- run length


def test_default_run_is_a_fixed_number_of_steps_not_one_epoch():
    cfg = TGTConfig()
    assert cfg.max_steps is None and cfg.epochs is None
    plan = StepPlan(cfg, 10)
    assert plan.total == DEFAULT_MAX_STEPS and plan.length_from == "default"
    assert StepPlan(cfg.replace(epochs=3), 200).total == 3 * math.ceil(200 / cfg.batch_size)
    assert StepPlan(cfg.replace(epochs=3, max_steps=7), 200).total == 7  # max_steps wins
    assert "1000 optimiser steps" in TGTConfig.describe()


def test_a_short_run_counted_in_epochs_warns_and_an_explicit_max_steps_does_not():
    with pytest.warns(ShortRunWarning, match=r"only 2 optimiser steps: epochs=1 x 2 steps per epoch \(10 examples"):
        make(batch_size=5, epochs=1, exploration="none").fit(data(10))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ShortRunWarning)
        make(batch_size=5, max_steps=2, exploration="none").fit(data(10))


# ----------------------------------------------------------------------------------------------- keyword-only


def test_decoder_and_encoder_are_keyword_only_with_a_clear_error():
    lab, dec, enc = teacher()
    with pytest.raises(TypeError, match=r"decoder=\.\.\., encoder=\.\.\..*keyword-only"):
        TGTTrainer(student(), lab, dec, enc)
    with pytest.raises(TypeError, match="the other 1 must be passed by name"):
        TGTTrainer(student(), lab, dec, encoder=enc)
    tr = TGTTrainer(student(), lab, encoder=enc, decoder=dec)  # any keyword order
    assert tr.decoder is dec and tr.encoder is enc


# ----------------------------------------------------------------------------------------------- labelled batches


def test_separate_unlabelled_stream_puts_labels_in_every_batch():
    x_l, y_l = data(6)
    x_u, y_u = data(50, seed=4)  # labels of the unlabelled stream must be ignored
    tr = make(Recording, max_steps=12, labelled_per_batch=2, exploration="random")
    tr.fit((x_l, y_l), unlabelled=(x_u, y_u))
    batches = tr.loaded[1:]
    assert len(batches) == 12
    for y in batches:
        assert y.numel() == 8 and int((y != -100).sum()) == 2
    # the labelled examples seen are those of train, with their labels
    seen = torch.cat([y[y != -100] for y in batches])
    assert set(seen.tolist()) <= set(y_l.tolist())


def test_default_share_of_labels_is_proportional_but_at_least_one():
    x_l, y_l = data(3)
    x_u, _ = data(200, seed=4)
    tr = make(Recording, max_steps=5)
    tr.fit((x_l, y_l), unlabelled=x_u)  # a bare tensor of inputs is a dataset too
    assert all(int((y != -100).sum()) == 1 for y in tr.loaded[1:])


def test_labelled_per_batch_on_one_dataset_with_minus_100_labels():
    x, y = data(40)
    y[4:] = -100  # 4 labelled, 36 unlabelled
    tr = make(Recording, max_steps=10, labelled_per_batch=3, grad_accum_steps=2)
    tr.fit((x, y))
    assert len(tr.loaded[1:]) == 20
    assert all(int((b != -100).sum()) == 3 for b in tr.loaded[1:])


def test_mixing_few_labels_without_labelled_per_batch_warns():
    x, y = data(64)
    y[3:] = -100
    with pytest.warns(UserWarning, match="labelled_per_batch"):
        make(max_steps=2, exploration="none").fit((x, y))


def test_mixed_plan_covers_each_pool_once_per_cycle_and_ranks_share_the_global_batch():
    cfg = TGTConfig(batch_size=10, labelled_per_batch=3, max_steps=20, seed=7)
    lab, unl = torch.arange(0, 5), torch.arange(5, 40)
    one = MixedPlan(cfg, lab, unl, 3)
    assert one.steps_per_epoch == 5  # 35 unlabelled / 7 per batch
    drawn = [one.batches(s)[1][0][1] for s in range(5)]
    unl_seen = sorted(i for b in drawn for i in b[3:])
    assert unl_seen == list(range(5, 40))  # one epoch: every unlabelled example exactly once
    lab_seen = [i for b in drawn for i in b[:3]]
    assert sorted(lab_seen[:5]) == list(range(5)) and sorted(lab_seen[5:10]) == list(range(5))  # labelled cycles
    for step in (0, 3, 11):
        whole = one.batches(step)[1][0][1]
        parts = [MixedPlan(cfg, lab, unl, 3, rank=r, world_size=3).batches(step)[1][0] for r in range(3)]
        assert sum((p[1] for p in parts), []) == whole
        assert [p[2] for p in parts] == [0, 4, 7]  # first positions of the shares 4, 3, 3
    with pytest.raises(ValueError, match="no.*labelled|has none"):
        make_plan(cfg, 5, torch.zeros(5, dtype=torch.bool), joined=False)
    with pytest.raises(ValueError, match="labelled_per_batch"):
        TGTConfig(batch_size=4, labelled_per_batch=5)


# ----------------------------------------------------------------------------------------------- calibration


def _ece(probs, y, bins=15):
    conf, pred = probs.max(1)
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    total = 0.0
    for b in range(bins):
        inside = (conf > edges[b]) & (conf <= edges[b + 1]) if b else (conf <= edges[1])
        if inside.any():
            total += float(inside.double().mean()) * abs(float((pred[inside] == y[inside]).double().mean())
                                                          - float(conf[inside].mean()))
    return total


def test_evaluation_reports_ece_and_nll():
    x, y = data(60)
    y_val = y.clone()
    y_val[::5] = -100  # unlabelled validation rows count for val_kd only
    tr = make(max_steps=3, exploration="none", ece_bins=15)
    tr.fit(data(16))
    out = tr.evaluate((x, y_val))
    with torch.no_grad():
        s = tr.student(x).double()
    keep = y_val != -100
    assert out["val_nll"] == pytest.approx(float(F.cross_entropy(s[keep], y[keep])), abs=1e-6)
    assert out["val_ce"] == out["val_nll"]
    assert out["val_ece"] == pytest.approx(_ece(torch.softmax(s[keep], -1), y[keep]), abs=1e-9)
    assert out["val_acc"] == pytest.approx(float((s[keep].argmax(1) == y[keep]).double().mean()))
    coarse = make(max_steps=3, exploration="none", ece_bins=2)
    coarse.student.load_state_dict(tr.student.state_dict())
    assert coarse.evaluate((x, y_val))["val_ece"] == pytest.approx(_ece(torch.softmax(s[keep], -1), y[keep], 2),
                                                                    abs=1e-9)


# ----------------------------------------------------------------------------------------------- input noise


def test_input_exploration_adds_the_counter_based_noise_to_the_inputs():
    from tgtfast import reference
    from tgtfast.train import noise_seed
    from tgtfast.train.exploration import explore

    lab, _, _ = teacher()
    cfg = TGTConfig(exploration="input", sigma=0.3, samples_per_example=2, seed=9)
    x = torch.rand(5, 6)
    x_new, t_new = explore(x, config=cfg, step=4, micro=1, start=3, student=student(), decoder=None, labeler=lab,
                           loss=None, temperature=1.0)
    noise = reference.latent_noise((10, 6), noise_seed(9, 4, 1, 0), 3 * 2 * 6)
    torch.testing.assert_close(x_new, x.repeat_interleave(2, 0) + 0.3 * noise, atol=1e-6, rtol=0)
    torch.testing.assert_close(t_new, lab(x_new).detach())
    # no generator needed
    tr = TGTTrainer(student(), lab, config=TGTConfig(exploration="input", batch_size=8, max_steps=2, progress=False))
    assert tr.fit(data(16)).steps == 2


# ----------------------------------------------------------------------------------------------- imperfect teachers


def _reliability(lab):
    from tgtfast.imperfect import TeacherReliability

    x, y = data(300, seed=8)
    with torch.no_grad():
        return TeacherReliability.fit(lab(x), y, bins=4, temperature=2.0), (x, y)


def _first_step_kd(imperfect, loss, rel=None, val=None):
    lab, dec, enc = teacher()
    cfg = TGTConfig(exploration="none", w_ce=0.0, w_tgt=0.0, batch_size=16, max_steps=1, log_every=1,
                    imperfect=imperfect, reliability_bins=4, progress=False, plot=False)
    tr = TGTTrainer(student(), lab, decoder=dec, encoder=enc, loss=loss, config=cfg, reliability=rel)
    x, y = data(16)
    hist = tr.fit((x, y), val=val)
    return hist.train[0]["kd"], x, lab, tr


def test_weighted_and_slam_terms_match_the_references():
    import tgtfast
    from tgtfast import reference

    lab, _, _ = teacher()
    rel, val = _reliability(lab)
    T = 2.0
    got, x, lab, _ = _first_step_kd("weighted", tgtfast.KDLoss(temperature=T), rel)
    with torch.no_grad():
        s, t = student()(x).double(), lab(x).double()
    w = rel.accuracy(t.float()).double()
    kl = (torch.softmax(t / T, -1) * (torch.log_softmax(t / T, -1) - torch.log_softmax(s / T, -1))).sum(1)
    assert got == pytest.approx(float((w * kl).mean()), rel=1e-5)
    got, *_ = _first_step_kd("slam", tgtfast.KDLoss(temperature=T), rel)
    want = reference.slam_loss(s, t, rel.accuracy(t.float()).double(), rel.k(t.float()), temperature=T)
    assert got == pytest.approx(float(want), rel=1e-5)
    # fitted on val when not given: the same estimate as fitting it by hand
    fitted, *_, tr = _first_step_kd("weighted", tgtfast.KDLoss(temperature=T), val=val)
    assert fitted == pytest.approx(float((w * kl).mean()), rel=1e-5)
    assert tr.reliability.num_examples == 300


def test_active_selection_keeps_samples_per_example_and_is_reproducible():
    lab, dec, enc = teacher()
    rel, _ = _reliability(lab)

    def run():
        cfg = TGTConfig(exploration="random", samples_per_example=2, active_pool=3, batch_size=8, max_steps=3,
                        log_every=1, progress=False, plot=False)
        s = student()
        calls = []
        s.register_forward_hook(lambda m, inp, out: calls.append((m.training, inp[0].shape[0])))
        TGTTrainer(s, lab, decoder=dec, encoder=enc, config=cfg, reliability=rel).fit(data(16))
        return s, calls

    (a, calls), (b, _) = run(), run()
    # per step: the 8 * 2 * 3 candidates scored in eval mode, then 8 examples + 8 * 2 kept samples trained on
    assert [c for c in calls if c[1] > 2] == [(False, 48), (True, 24)] * 3
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_imperfect_options_refuse_what_they_cannot_do():
    import tgtfast

    lab, dec, enc = teacher()
    with pytest.raises(ValueError, match="KDLoss"):
        TGTTrainer(student(), lab, loss=tgtfast.PTLoss([0.5]), config=TGTConfig(exploration="none",
                                                                               imperfect="weighted"))
    with pytest.raises(ValueError, match="active_pool.*exploration"):
        TGTTrainer(student(), lab, config=TGTConfig(exploration="none", active_pool=2))
    with pytest.raises(ValueError, match="val="):
        _first_step_kd("slam", tgtfast.KDLoss())
    with pytest.raises(ValueError, match="imperfect"):
        TGTConfig(imperfect="noisy")
