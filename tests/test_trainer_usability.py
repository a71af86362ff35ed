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

    def _load_batch(self, dataset, collate, indices, device, batch=None):
        x, y = super()._load_batch(dataset, collate, indices, device, batch)
        self.loaded.append(y.clone())
        return x, y


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
