"""TGTTrainer: exploration modes, the loss terms against a hand-written step, accumulation, the teacher cache,
determinism, bad input, resume after SIGKILL, and 2-process torchrun against a single process."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tgtfast
from tgtfast import reference
from tgtfast.train import TGTConfig, TGTTrainer, noise_seed
from tgtfast.train.data import StepPlan
from tgtfast.train.exploration import explore

HERE = os.path.dirname(os.path.abspath(__file__))
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
SCRIPT = os.path.join(HERE, "trainer_script.py")
sys.path.insert(0, HERE)
import trainer_script  # noqa: E402
N, D, LATENT, K = 24, 6, 3, 4


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead (and the CI machine is small)
    yield
    torch.set_num_threads(threads)


def teacher():
    torch.manual_seed(11)
    labeler = nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, K))
    encoder = nn.Linear(D, LATENT)
    decoder = nn.Sequential(nn.Linear(LATENT, 16), nn.ReLU(), nn.Linear(16, D))
    return labeler, decoder, encoder


def student(seed=5):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, K))


def data(n=N, unlabelled=True):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, D, generator=g)
    y = torch.randint(0, K, (n,), generator=g)
    if unlabelled:
        y[::4] = -100
    return x, y


def train(cfg, *, loss=None, s=None, d=None, val=None, **kw):
    s = student() if s is None else s
    lab, dec, enc = teacher()
    tr = TGTTrainer(s, lab, decoder=dec, encoder=enc, loss=loss, config=cfg, **kw)
    hist = tr.fit(data() if d is None else d, val=val)
    return s, hist


def assert_same_weights(a, b, atol=0.0):
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb
        if atol == 0.0:
            assert torch.equal(va, vb), ka
        else:
            torch.testing.assert_close(va, vb, atol=atol, rtol=0, msg=ka)


# ----------------------------------------------------------------------------------------------------- modes


@pytest.mark.parametrize("mode", ["none", "random", "gradient"])
def test_modes_train(mode):
    cfg = TGTConfig(exploration=mode, batch_size=8, max_steps=4, log_every=1, samples_per_example=2, progress=False)
    before = student()
    s, hist = train(cfg)
    assert hist.steps == 4 and len(hist.train) == 4
    for rec in hist.train:
        for key in ("loss", "ce", "kd", "tgt", "examples_per_s", "samples_per_s"):
            assert torch.isfinite(torch.tensor(rec[key])), (key, rec)
        assert rec["loss"] == pytest.approx(rec["ce"] + rec["kd"] + rec["tgt"])
        assert (rec["tgt"] > 0) == (mode != "none")
        assert rec["samples_per_s"] == pytest.approx(rec["examples_per_s"] * (1 if mode == "none" else 3))
    assert any(not torch.equal(a, b) for a, b in zip(before.parameters(), s.parameters()))


def _kl(s, t_logits, temperature):
    return F.kl_div(F.log_softmax(s / temperature, -1), F.softmax(t_logits / temperature, -1), reduction="sum")


def test_loss_terms_match_eager_step():
    """One SGD step of the trainer against the objective written out by hand (random exploration, S = 2)."""
    T, sigma, S, lr = 2.0, 0.8, 2, 0.1
    w = dict(w_ce=0.7, w_kd=0.4, w_tgt=1.3)
    cfg = TGTConfig(exploration="random", sigma=sigma, samples_per_example=S, batch_size=N, max_steps=1,
                    optimizer="sgd", momentum=0.0, lr=lr, seed=9, log_every=1, progress=False, **w)
    lab, dec, enc = teacher()
    s_trained = student()
    tr = TGTTrainer(s_trained, lab, decoder=dec, encoder=enc, loss=tgtfast.KDLoss(temperature=T), config=cfg)
    x_all, y_all = data()
    hist = tr.fit((x_all, y_all))

    # the hand-written step: the example order of the (single) micro-batch is the trainer's shuffle
    _, [(micro, idx, start, size)] = StepPlan(cfg, N).batches(0)
    assert (micro, start, size) == (0, 0, N) and sorted(idx) == list(range(N))
    x, y = x_all[idx], y_all[idx]
    s_ref = student()
    with torch.no_grad():
        t = lab(x)
        z = enc(x).repeat_interleave(S, 0)
        noise = reference.latent_noise(tuple(z.shape), noise_seed(9, 0, 0, 0), 0)
        x_new = dec(z + sigma * noise)
        t_new = lab(x_new)
    out, out_new = s_ref(x), s_ref(x_new)
    lab_mask = y != -100
    ce = F.cross_entropy(out, y, ignore_index=-100, reduction="sum") / lab_mask.sum()
    kd = _kl(out, t, T) / N
    tgt = _kl(out_new, t_new, T) / (N * S)
    rec = hist.train[0]
    assert rec["ce"] == pytest.approx(ce.item(), rel=1e-5)
    assert rec["kd"] == pytest.approx(kd.item(), rel=1e-4)
    assert rec["tgt"] == pytest.approx(tgt.item(), rel=1e-4)
    loss = w["w_ce"] * ce + w["w_kd"] * kd + w["w_tgt"] * tgt
    assert rec["loss"] == pytest.approx(loss.item(), rel=1e-5)
    loss.backward()
    with torch.no_grad():
        for p in s_ref.parameters():
            p -= lr * p.grad
    assert_same_weights(s_trained, s_ref, atol=1e-6)


def test_gradient_exploration_matches_eager_ascent():
    """The TGT term of one gradient-exploration step against the ascent written out by hand."""
    T, sigma, S, eta, steps, radius = 1.5, 0.4, 2, 0.25, 3, 0.6
    cfg = TGTConfig(exploration="gradient", sigma=sigma, samples_per_example=S, explore_steps=steps,
                    explore_step_size=eta, explore_radius=radius, batch_size=N, max_steps=1, seed=4, log_every=1,
                    progress=False)
    lab, dec, enc = teacher()
    tr = TGTTrainer(student(), lab, decoder=dec, encoder=enc, loss=tgtfast.KDLoss(temperature=T), config=cfg)
    x_all, y_all = data()
    hist = tr.fit((x_all, y_all))
    _, [(_, idx, _, _)] = StepPlan(cfg, N).batches(0)
    x = x_all[idx]
    f = student()
    anchor = enc(x).detach().repeat_interleave(S, 0)
    z = anchor + sigma * reference.latent_noise(tuple(anchor.shape), noise_seed(4, 0, 0, 0), 0)
    for _ in range(steps):
        z = z.detach().requires_grad_(True)
        xz = dec(z)
        div = _kl(f(xz), lab(xz), T)
        (g,) = torch.autograd.grad(div, z)
        z = z.detach() + eta * g / g.norm(dim=1, keepdim=True)
        delta = z - anchor
        z = anchor + delta * torch.clamp(radius / delta.norm(dim=1, keepdim=True), max=1.0)
    with torch.no_grad():
        x_new = dec(z)
        tgt = _kl(f(x_new), lab(x_new), T) / (N * S)
    assert hist.train[0]["tgt"] == pytest.approx(tgt.item(), rel=1e-4)


def test_gradient_exploration_ascends_and_respects_radius():
    """With an identity generator x' = z: ascent raises the divergence, the radius bounds ||x' - x||."""
    torch.manual_seed(0)
    lab = nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, K))
    x = torch.randn(8, D)
    loss = tgtfast.KDLoss()

    def explored(**kw):
        cfg = TGTConfig(exploration="gradient", sigma=0.0, progress=False, **kw)
        tr = TGTTrainer(student(), lab, decoder=nn.Identity(), encoder=nn.Identity(), loss=loss, config=cfg)
        tr._freeze_teacher()
        x_new, t_new = explore(x, config=cfg, step=0, micro=0, start=0, student=tr.student, decoder=tr.decoder,
                               labeler=tr.labeler, loss=tr.loss, temperature=tr.temperature)
        with torch.no_grad():
            div = F.kl_div(F.log_softmax(tr.student(x_new), -1), F.softmax(t_new, -1), reduction="none").sum(-1)
        torch.testing.assert_close(t_new.softmax(-1), lab(x_new).softmax(-1))
        return x_new, div

    with torch.no_grad():
        div0 = F.kl_div(F.log_softmax(student()(x), -1), F.softmax(lab(x), -1), reduction="none").sum(-1)
    x1, div1 = explored(explore_steps=3, explore_step_size=0.3)
    assert bool((div1 > div0).all())
    dist1 = (x1 - x).norm(dim=1)  # three normalised steps of 0.3
    assert bool((dist1 <= 0.9 + 1e-5).all()) and bool((dist1 > 0.3).all())
    x2, _ = explored(explore_steps=5, explore_step_size=0.3, explore_radius=0.5)
    assert bool(((x2 - x).norm(dim=1) <= 0.5 + 1e-5).all())


# ----------------------------------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize("mode", ["none", "gradient"])
def test_accumulation_is_normalised_by_the_total_count(mode):
    """4 micro-batches of 6 accumulated == one batch of 24 (CE over the labelled count, which differs per micro)."""
    kw = dict(exploration=mode, sigma=0.0, max_steps=1, optimizer="sgd", momentum=0.0, lr=0.2, progress=False)
    a, ha = train(TGTConfig(batch_size=N, grad_accum_steps=1, **kw))
    b, hb = train(TGTConfig(batch_size=6, grad_accum_steps=4, **kw))
    assert_same_weights(a, b, atol=1e-6)
    for key in ("loss", "ce", "kd", "tgt", "acc"):
        assert ha.train[0][key] == pytest.approx(hb.train[0][key], rel=1e-5, abs=1e-7)


def test_cached_and_uncached_teacher_agree():
    kw = dict(exploration="random", batch_size=8, max_steps=3, log_every=1, progress=False)
    a, ha = train(TGTConfig(cache_teacher=True, **kw))
    b, hb = train(TGTConfig(cache_teacher=False, **kw))
    assert_same_weights(a, b, atol=1e-6)
    for ra, rb in zip(ha.train, hb.train):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)


def test_deterministic_and_seeded():
    kw = dict(exploration="random", batch_size=8, max_steps=3, progress=False)
    a, _ = train(TGTConfig(seed=1, **kw))
    b, _ = train(TGTConfig(seed=1, **kw))
    c, _ = train(TGTConfig(seed=2, **kw))
    assert_same_weights(a, b)
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_noise_seed_streams():
    seeds = {noise_seed(0, st, m, r) for st in range(4) for m in range(3) for r in range(2)}
    assert len(seeds) == 24 and all(0 <= s < 2**63 for s in seeds)
    assert noise_seed(0, 1, 2, 0) == noise_seed(0, 1, 2, 0) != noise_seed(1, 1, 2, 0)


def test_batch_fn_dict_batches_and_bf16():
    cfg = TGTConfig(exploration="random", batch_size=8, max_steps=2, bf16=True, progress=False)
    s, hist = train(cfg, d=_Rows(), batch_fn=lambda b: (b["image"], b["label"]))
    assert hist.steps == 2 and torch.isfinite(torch.tensor(hist.final["loss"]))
    with pytest.raises(TypeError, match="batch_fn"):
        train(cfg, d=_Rows())


def test_ptloss_and_val_metrics(tmp_path):
    cfg = TGTConfig(exploration="gradient", batch_size=8, max_steps=3, eval_every=2, log_every=1,
                    out_dir=str(tmp_path), progress=False)
    loss = tgtfast.PTLoss([0.5, -0.2], temperature=1.5)
    vx, vy = data(12)
    s, hist = train(cfg, loss=loss, val=(vx, vy))
    lab, _, _ = teacher()
    tr = TGTTrainer(s, lab, config=cfg.replace(exploration="none", out_dir=None), loss=loss)
    hist2 = tr.evaluate((vx, vy))
    assert [r["step"] for r in hist.val] == [2, 3]
    assert hist.val[-1]["val_acc"] == pytest.approx(hist2["val_acc"])
    lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [l["step"] for l in lines if "loss" in l] == [1, 2, 3]
    if HAVE_MATPLOTLIB:  # the plot is optional: written when matplotlib is installed
        assert os.path.getsize(tmp_path / "curves.png") > 1000
    assert json.load(open(tmp_path / "history.json"))["steps"] == 3


# ----------------------------------------------------------------------------------------------------- bad input


def test_config_validation():
    with pytest.raises(ValueError, match="unknown config key.*'bacth_size'"):
        TGTConfig.from_dict({"bacth_size": 8})
    with pytest.raises(TypeError, match="config.batch_size must be an int"):
        TGTConfig(batch_size="8")
    with pytest.raises(TypeError, match="config.bf16 must be a bool"):
        TGTConfig(bf16=1)
    with pytest.raises(ValueError, match="config.exploration must be one of"):
        TGTConfig(exploration="adversarial")
    with pytest.raises(ValueError, match=r"config.sigma must be in \[0, inf\), got -1.0"):
        TGTConfig(sigma=-1.0)
    with pytest.raises(ValueError, match=r"config.lr must be in \(0, inf\), got 0.0"):
        TGTConfig(lr=0)
    with pytest.raises(ValueError, match="need config.out_dir"):
        TGTConfig(resume=True)
    text = TGTConfig.describe()
    for f in TGTConfig.__dataclass_fields__:
        line = next(l for l in text.splitlines() if l.startswith(f + " ("))
        assert len(line.split("): ", 1)[1]) > 10, line  # every field has a description


def test_bad_models_and_data():
    lab, dec, enc = teacher()
    cfg = TGTConfig(batch_size=8, max_steps=1, progress=False)
    wide = nn.Linear(D, K + 1)
    with pytest.raises(ValueError, match="student's output width \\(5\\) differs from the labeler's \\(4\\)"):
        TGTTrainer(wide, lab, decoder=dec, encoder=enc, config=cfg).fit(data())
    bad_dec = nn.Linear(LATENT, D + 2)
    with pytest.raises(ValueError, match="decoder's output"):
        TGTTrainer(student(), lab, decoder=bad_dec, encoder=enc, config=cfg).fit(data())
    with pytest.raises(ValueError, match="decoder cannot take"):
        TGTTrainer(student(), lab, decoder=nn.Linear(LATENT + 1, D), encoder=enc, config=cfg).fit(data())
    with pytest.raises(ValueError, match="train is empty"):
        TGTTrainer(student(), lab, decoder=dec, encoder=enc, config=cfg).fit(
            (torch.zeros(0, D), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="needs an encoder"):
        TGTTrainer(student(), lab, decoder=dec, encoder=None, config=cfg)
    with pytest.raises(TypeError, match="config must be a tgtfast.TGTConfig"):
        TGTTrainer(student(), lab, decoder=dec, encoder=enc, config={"batch_size": 8})
    with pytest.raises(ValueError, match="labels must be in"):
        TGTTrainer(student(), lab, decoder=dec, encoder=enc, config=cfg).fit((data()[0], torch.full((N,), K)))


def test_checkpoint_from_another_config_is_refused_and_kept(tmp_path):
    cfg = TGTConfig(exploration="none", batch_size=8, max_steps=2, out_dir=str(tmp_path), plot=False, progress=False)
    train(cfg)
    ckpt = tmp_path / "checkpoint.pt"
    before = ckpt.read_bytes()
    metrics = (tmp_path / "metrics.jsonl").read_bytes()
    with pytest.raises(ValueError, match="another configuration.*'lr'"):
        train(cfg.replace(lr=0.5, resume=True))
    with pytest.raises(ValueError, match="resume=True .* overwrite=True"):
        train(cfg)
    with pytest.raises(ValueError, match="student's output width"):
        s = nn.Linear(D, K + 1)
        train(cfg.replace(overwrite=True), s=s)
    assert ckpt.read_bytes() == before and (tmp_path / "metrics.jsonl").read_bytes() == metrics
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "history.json", "metrics.jsonl"]


# ----------------------------------------------------------------------------------------------------- processes


def _run(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=240, **kw)


def test_resume_after_sigkill_matches_straight_run(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    trainer_script.run(straight, tmp_path / "a.pt", dropout=True)  # in this process: the same code, one thread
    r = _run([sys.executable, SCRIPT, str(killed), str(tmp_path / "b.pt"), "--dropout", "--kill-at", "5"])
    assert r.returncode == -9, (r.returncode, r.stderr)
    assert torch.load(killed / "checkpoint.pt", weights_only=True)["step"] == 3
    assert not (tmp_path / "b.pt").exists()
    r = _run([sys.executable, SCRIPT, str(killed), str(tmp_path / "b.pt"), "--dropout", "--resume"])
    assert r.returncode == 0, r.stderr
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(l)["step"] for l in open(killed / "metrics.jsonl")]
    assert steps == list(range(1, 9))  # the lines of steps 4-5 of the killed run were replaced, not duplicated
    ha = json.load(open(straight / "history.json"))
    hb = json.load(open(killed / "history.json"))
    assert [r["loss"] for r in ha["train"]] == [r["loss"] for r in hb["train"]]


def test_torchrun_two_processes_match_one(tmp_path):
    """Gradient exploration (its random start included) with accumulation, on 2 gloo processes and on one."""
    mode = ["--mode", "gradient", "--steps", "4"]
    trainer_script.run(tmp_path / "one", tmp_path / "one.pt", mode="gradient", steps=4)
    r = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              SCRIPT, str(tmp_path / "two"), str(tmp_path / "two.pt"), *mode])
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for k in one:
        torch.testing.assert_close(one[k], two[k], atol=1e-5, rtol=1e-5, msg=k)
    h1 = json.load(open(tmp_path / "one" / "history.json"))["train"]
    h2 = json.load(open(tmp_path / "two" / "history.json"))["train"]
    assert [r["loss"] for r in h1] == pytest.approx([r["loss"] for r in h2], rel=1e-5)


@pytest.mark.parametrize("mode", ["random", "gradient"])
def test_new_samples_go_through_perturb_decode_label(monkeypatch, mode):
    """The trainer labels its new samples with the package's perturb -> decode -> label op (fused when it can)."""
    from tgtfast.train import exploration

    inner = exploration.perturb_decode_label_fn()
    calls = []

    def spy(z, decoder, labeler, **kw):
        calls.append(kw)
        return inner(z, decoder, labeler, **kw)

    monkeypatch.setattr(tgtfast, "perturb_decode_label", spy, raising=False)
    cfg = TGTConfig(exploration=mode, batch_size=8, max_steps=2, explore_steps=2, sigma=0.3, progress=False)
    train(cfg, loss=tgtfast.KDLoss(temperature=3.0))
    per_micro = 1 if mode == "random" else 3  # gradient: one call per ascent step and one for the final labels
    assert len(calls) == 2 * per_micro
    assert all(c["temperature"] == 3.0 for c in calls)
    if mode == "random":
        assert [c["sigma"] for c in calls] == [0.3, 0.3] and calls[0]["seed"] == noise_seed(0, 0, 0, 0)


def test_lr_schedule_and_warmup():
    cfg = TGTConfig(exploration="none", batch_size=8, max_steps=6, lr=0.1, lr_schedule="linear", warmup_steps=2,
                    log_every=1, progress=False)
    _, hist = train(cfg)
    lrs = [r["lr"] for r in hist.train]
    assert lrs[:3] == pytest.approx([0.1 / 3, 0.2 / 3, 0.1])
    assert lrs[3:] == pytest.approx([0.1 * (1 - k / 4) for k in (1, 2, 3)])


class _Rows(torch.utils.data.Dataset):
    def __init__(self):
        self.x, self.y = data()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.y[i]}


def test_dataloader_workers_give_the_same_run():
    """Worker processes load the batches in the loop's order: same weights as loading in the main process."""
    kw = dict(exploration="random", batch_size=5, grad_accum_steps=2, epochs=2, progress=False)
    fn = lambda b: (b["image"], b["label"])  # noqa: E731
    a, ha = train(TGTConfig(num_workers=0, **kw), d=_Rows(), batch_fn=fn)
    b, hb = train(TGTConfig(num_workers=2, **kw), d=_Rows(), batch_fn=fn)
    assert ha.steps == hb.steps == 6  # 5 micro-batches of 5 (the last one of 4) per epoch, 2 per step
    assert_same_weights(a, b)
