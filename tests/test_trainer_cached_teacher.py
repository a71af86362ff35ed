"""TGTTrainer with a cached (offline) teacher: ``batch_fn`` returns ``(inputs, labels, teacher)`` with dense
teacher logits or a :class:`tgtfast.SparseTeacher` read from a :class:`tgtfast.TeacherCache`, which replace the
labeler for the distillation term of the training inputs; checked against a hand-written step in float64."""

import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tgtfast
from tgtfast.cache import CachedTeacherDataset, TeacherCache, TeacherCollator
from tgtfast.train import TGTConfig, TGTTrainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_trainer import D, K, _one_thread, teacher  # noqa: E402,F401  (models and the one-thread fixture)

N, LR = 12, 0.5


def student64():
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, K)).double()


def inputs():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (N,), generator=g)
    y[::3] = -100
    t = torch.randn(N, K, generator=g, dtype=torch.float64) * 2
    return x, y, t


def one_step(train, loss, labeler=None, batch_fn=None, **cfg):
    """One SGD step over the whole training set; returns the trainer and the step's record."""
    config = TGTConfig(**{**dict(exploration="none", batch_size=N, max_steps=1, log_every=1, optimizer="sgd",
                                 lr=LR, momentum=0.0, progress=False, plot=False), **cfg})
    tr = TGTTrainer(student64(), labeler, loss=loss, config=config, batch_fn=batch_fn)
    hist = tr.fit(train)
    return tr, hist.train[0]


def hand_step(x, y, kd_rows):
    """Parameters after one SGD step on CE(labelled) / n_lab + sum(kd_rows(s)) / N, in float64."""
    s_model = student64()
    s = s_model(x)
    lab = y != -100
    ce = F.cross_entropy(s[lab], y[lab], reduction="sum") / int(lab.sum())
    kd = kd_rows(s).sum() / N
    (ce + kd).backward()
    with torch.no_grad():
        return [p - LR * p.grad for p in s_model.parameters()], float(kd)


def test_dense_cached_teacher_without_a_labeler_matches_a_hand_step():
    x, y, t = inputs()
    T = 2.0
    tr, rec = one_step((x, y, t), tgtfast.KDLoss(temperature=T), batch_fn=lambda b: (b[0], b[1], b[2]))

    def kl(s):
        return (torch.softmax(t / T, -1) * (torch.log_softmax(t / T, -1) - torch.log_softmax(s / T, -1))).sum(1)

    want, kd = hand_step(x, y, kl)
    assert rec["kd"] == pytest.approx(kd, rel=1e-5)
    for p, w in zip(tr.student.parameters(), want):
        torch.testing.assert_close(p, w, rtol=1e-5, atol=1e-6)
    assert rec["teacher_queries"] == 0 and tr.history.teacher_queries == 0  # the teacher was never run


def _sparse_cache(tmp_path, k=2):
    g = torch.Generator().manual_seed(7)
    table = torch.randn(N, K, generator=g) * 2  # the teacher's logits of example i: one "token" i per example

    def lm_teacher(input_ids, attention_mask=None):
        return table[input_ids]

    tokens = [[i] for i in range(N)]
    cache = TeacherCache.write(str(tmp_path / "cache"), lm_teacher, tokens, k=k)
    return CachedTeacherDataset(tokens, cache), TeacherCollator(cache), cache


def test_sparse_teacher_from_a_teacher_cache_matches_a_hand_step(tmp_path):
    x, y, _ = inputs()
    ds, collate, cache = _sparse_cache(tmp_path)

    def batch_fn(b):
        i, st = b["input_ids"][:, 0], b["teacher"]  # one cached row per example
        return x[i], y[i], tgtfast.SparseTeacher(st.indices[:, 0], st.logprobs[:, 0], tail=st.tail,
                                                 temperature=st.temperature)

    loader = torch.utils.data.DataLoader(ds, batch_size=N, collate_fn=collate)
    tr, rec = one_step(loader, tgtfast.DistillLoss("forward_kl"), batch_fn=batch_fn)
    idx = torch.stack([cache.example(i)[1][0].long() for i in range(N)])  # [N, k] classes kept by the cache
    lp = torch.stack([cache.example(i)[2][0].double() for i in range(N)])

    def kl(s):  # KL over the k kept classes and one tail bucket, the student coarse-grained the same way
        q = torch.softmax(s, -1)
        qk = q.gather(1, idx)
        p = torch.cat([lp.exp(), (1 - lp.exp().sum(1, keepdim=True)).clamp_min(0)], 1)
        qc = torch.cat([qk, 1 - qk.sum(1, keepdim=True)], 1)
        return torch.where(p > 0, p * (p.log() - qc.log()), torch.zeros_like(p)).sum(1)

    want, kd = hand_step(x, y, kl)
    assert rec["kd"] == pytest.approx(kd, rel=1e-4)
    for p, w in zip(tr.student.parameters(), want):
        torch.testing.assert_close(p, w, rtol=1e-4, atol=1e-6)
    # the evaluation's val_kd is taken against the cached teacher too
    with torch.no_grad():
        assert tr.evaluate(loader)["val_kd"] == pytest.approx(float(kl(tr.student(x)).mean()), rel=1e-4)


def test_losses_that_take_no_sparse_teacher_are_named(tmp_path):
    x, y, _ = inputs()
    ds, collate, _ = _sparse_cache(tmp_path)

    def batch_fn(b):
        i, st = b["input_ids"][:, 0], b["teacher"]
        return x[i], y[i], tgtfast.SparseTeacher(st.indices[:, 0], st.logprobs[:, 0])

    loader = torch.utils.data.DataLoader(ds, batch_size=N, collate_fn=collate)
    for loss in (tgtfast.KDLoss(), tgtfast.PTLoss([0.5])):
        with pytest.raises(TypeError, match=type(loss).__name__ + ".*SparseTeacher|SparseTeacher.*"
                                            + type(loss).__name__):
            one_step(loader, loss, batch_fn=batch_fn)


def test_cached_teacher_with_exploration_still_labels_new_samples_with_the_labeler():
    x, y, t = inputs()
    lab, dec, enc = teacher()
    lab, dec, enc = lab.double(), dec.double(), enc.double()
    calls = []
    lab.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    cfg = TGTConfig(exploration="input", samples_per_example=2, sigma=0.1, batch_size=N, max_steps=2, log_every=1,
                    progress=False, plot=False)
    tr = TGTTrainer(student64(), lab, loss=tgtfast.KDLoss(), config=cfg, batch_fn=lambda b: (b[0], b[1], b[2]))
    hist = tr.fit((x, y, t))
    # the shape probe (2 rows), no cache pass over the training inputs, then the 2 x 12 new samples per step
    assert calls == [2, 2 * N, 2 * N]
    assert [r["teacher_queries"] for r in hist.train] == [2 * N, 2 * N] and hist.teacher_queries == 4 * N
    with pytest.raises(ValueError, match="labeler is None.*exploration"):
        TGTTrainer(student64(), None, config=cfg)


def test_bad_cached_teachers_are_refused():
    x, y, t = inputs()
    with pytest.raises(ValueError, match="batch_fn must return .*teacher"):
        one_step((x, y), tgtfast.KDLoss())  # no labeler and no teacher
    with pytest.raises(ValueError, match=r"teacher logits must have shape \[2, K\]"):  # the first 2 examples
        one_step((x, y, t), tgtfast.KDLoss(), batch_fn=lambda b: (b[0], b[1], b[2][:, None]))
    with pytest.raises(TypeError, match="third element"):
        one_step((x, y, t), tgtfast.KDLoss(), batch_fn=lambda b: (b[0], b[1], "logits"))
    with pytest.raises(ValueError, match="output width"):
        one_step((x, y, t[:, :3]), tgtfast.KDLoss(), batch_fn=lambda b: (b[0], b[1], b[2]))
    with pytest.raises(ValueError, match="labeler is None.*imperfect"):
        TGTTrainer(student64(), None, config=TGTConfig(exploration="none", imperfect="weighted"))
