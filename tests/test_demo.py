"""``tgtfast demo``: the command end to end on a small configuration, the data splits, the teacher cache, bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tgtfast import demo

ROWS = [("onehot", "-")] + [(m, lo) for m in ("kd", "real-unlabelled", "input-noise", "tgt-random", "tgt-gradient")
                            for lo in ("kl", "ptloss")]
WEAK_ROWS = [("kd", "kl"), ("kd", "ptloss"), ("weighted", "kl"), ("slam", "kl"), ("active", "kl")]


def _block(lines, start, rows):
    """The rows of the first table block at or after line ``start``."""
    header = next(i for i in range(start, len(lines)) if lines[i].startswith("method"))
    assert lines[header - 1] == "n = 20 labelled examples"
    assert lines[header].split() == ["method", "loss", "accuracy", "%", "Δ", "kd", "(points)", "ECE", "%", "NLL"]
    body = lines[header + 2: header + 2 + len(rows)]
    assert [tuple(line.split()[:2]) for line in body] == rows
    return body


def _check_cells(body, rows, run, base_of):
    """Each printed row against its run (one seed): accuracy, the difference to its baseline row computed from the
    runs themselves, ECE, NLL."""
    for line, key in zip(body, rows):
        cells = line.split()
        r = run[key]
        assert float(cells[2]) == pytest.approx(100 * r["test_accuracy"], abs=0.051) and cells[3:5] == ["±", "0.0"]
        base = base_of(key)
        if base is None:
            assert cells[5] == "-"
            rest = cells[6:]
        else:
            assert float(cells[5]) == pytest.approx(100 * (r["test_accuracy"] - run[base]["test_accuracy"]),
                                                    abs=0.051)
            rest = cells[8:]
        assert float(rest[0]) == pytest.approx(100 * r["test_ece"], abs=0.051)
        assert float(rest[3]) == pytest.approx(r["test_nll"], abs=0.00051)


def _cli(*args, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # the `tgtfast` entry point's dispatcher, run by this interpreter
    code = "import sys; from tgtfast.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, "demo", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("demo-cache"))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, cache_dir):
    """``tgtfast demo --quick`` with one seed and fewer steps, teacher trained into a fresh cache."""
    out = tmp_path_factory.mktemp("demo-out")
    proc = _cli("--quick", "--seeds", "0", "--steps", "100", "--jobs", "1", "--out", str(out), "--cache-dir",
                cache_dir, "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "results.json") as fh:
        result = json.load(fh)
    return proc, out, result


def test_quick_cli_prints_table_and_writes_json_and_png(quick_run):
    proc, out, result = quick_run
    lines = proc.stdout.splitlines()
    body = _block(lines, 0, ROWS)
    run = {(r["method"], r["loss"]): r for r in result["runs"]}
    _check_cells(body, ROWS, run, lambda key: None if key[0] == "kd" else ("kd", "kl" if key[1] == "-" else key[1]))
    teacher = result["teacher"]
    assert f"accuracy {100 * teacher['labeler_test_accuracy']:.1f} %, ECE {100 * teacher['labeler_test_ece']:.1f} %" \
        in proc.stdout
    assert result["table"] in proc.stdout
    with open(out / "results.png", "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert result["config"]["budgets"] == [20] and result["config"]["seeds"] == [0]
    assert result["splits"] == {"teacher_train": 1077, "val": 270, "test": 450}
    assert len(result["runs"]) == len(ROWS)
    for r in result["runs"]:
        assert 0.0 <= r["test_accuracy"] <= 1.0 and 0.0 <= r["val_accuracy"] <= 1.0
        assert 0.0 <= r["test_ece"] <= 1.0 and r["test_nll"] > 0
    assert result["teacher"]["from_cache"] is False
    coeffs = torch.tensor(result["proxy_teacher"]["coeffs"])
    assert coeffs.shape == (5, 10) and result["proxy_teacher"]["deviation"] <= result["proxy_teacher"]["kl_deviation"]


def test_quick_cli_second_regime_overconfident_teacher(quick_run, cache_dir):
    proc, out, result = quick_run
    weak = result["weak_regime"]
    lines = proc.stdout.splitlines()
    body = _block(lines, next(i for i, line in enumerate(lines) if line.startswith("Second regime")), WEAK_ROWS)
    # the temperature: KL's best mean validation accuracy over {1, 2, 4}, recomputed from the runs
    kl = [r for r in weak["runs"] if (r["method"], r["loss"]) == ("kd", "kl")]
    assert sorted(r["temperature"] for r in kl) == [1.0, 2.0, 4.0]
    val = {r["temperature"]: r["val_accuracy"] for r in kl}
    best = max(val, key=lambda t: (val[t], -t))
    assert weak["temperature"] == best and f"temperature T = {best:g} for every row" in proc.stdout
    assert {r["temperature"] for r in weak["runs"] if (r["method"], r["loss"]) != ("kd", "kl")} == {best}
    run = {(r["method"], r["loss"]): r for r in weak["runs"] if r["temperature"] == best}
    _check_cells(body, WEAK_ROWS, run, lambda key: None if key == ("kd", "kl") else ("kd", "kl"))
    # the teacher: few labels, worse than the strong one, more confident than accurate; printed and cached apart
    t = weak["teacher"]
    assert t["labels"] == 50 and t["labeler_test_accuracy"] < result["teacher"]["labeler_test_accuracy"] - 0.05
    assert t["labeler_val_mean_confidence"] > t["labeler_val_accuracy"]
    assert f"test accuracy {100 * t['labeler_test_accuracy']:.1f} %, ECE {100 * t['labeler_test_ece']:.1f} %" \
        in proc.stdout
    assert os.path.basename(t["cache_file"]).startswith("weak-teacher-") and os.path.exists(t["cache_file"])
    assert weak["proxy_teacher"]["temperature"] == best
    assert torch.tensor(weak["proxy_teacher"]["coeffs"]).shape == (5, 10)
    assert weak["table"] in proc.stdout and result["config"]["reliability_bins"] * 25 <= result["splits"]["val"]


def test_quick_run_learns(quick_run):
    """The teacher is good, and TGT lifts a 20-label student far above one-hot training (about 20 points here;
    the bound leaves a wide margin)."""
    _, _, result = quick_run
    assert result["teacher"]["labeler_test_accuracy"] > 0.93
    acc = {(r["method"], r["loss"]): r["test_accuracy"] for r in result["runs"]}
    assert acc[("onehot", "-")] > 0.4  # better than chance (0.1) even from 20 labels
    for loss in ("kl", "ptloss"):
        for method in ("tgt-random", "tgt-gradient", "real-unlabelled", "input-noise"):
            assert acc[(method, loss)] > acc[("onehot", "-")] + 0.08, method


def test_second_run_reuses_cached_teacher_in_parallel_workers(quick_run, cache_dir, tmp_path):
    _, _, first = quick_run
    proc = _cli("--budgets", "10", "--seeds", "0", "1", "--methods", "onehot", "kd", "--losses", "kl",
                "--steps", "20", "--jobs", "2", "--out", str(tmp_path), "--cache-dir", cache_dir, "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "teacher: loaded from cache" in proc.stdout and "weak teacher: loaded from cache" in proc.stdout
    with open(tmp_path / "results.json") as fh:
        result = json.load(fh)
    assert result["teacher"]["from_cache"] is True
    assert result["teacher"]["labeler_test_accuracy"] == first["teacher"]["labeler_test_accuracy"]
    assert result["jobs"] == 2
    assert sorted((r["method"], r["seed"]) for r in result["runs"]) == [("kd", 0), ("kd", 1), ("onehot", 0),
                                                                         ("onehot", 1)]
    assert result["proxy_teacher"] == {}  # no PTLoss row asked for, no coefficient search
    # the second regime through the process pool: its other rows submitted once its KL runs were in
    weak = result["weak_regime"]
    assert weak["teacher"]["from_cache"] is True
    assert sorted((r["method"], r["loss"], r["temperature"]) for r in weak["runs"] if r["seed"] == 0) == sorted(
        [("kd", "kl", t) for t in (1.0, 2.0, 4.0)] + [(m, lo, weak["temperature"]) for m, lo in WEAK_ROWS[1:]])
    # the JSON summary agrees with the runs
    for s in result["summary"]:
        accs = [r["test_accuracy"] for r in result["runs"] if r["method"] == s["method"]]
        assert s["test_mean"] == pytest.approx(sum(accs) / 2)
        assert s["test_std"] == pytest.approx(float(torch.tensor(accs).std()))


@pytest.mark.parametrize("args, needle", [
    (["--budgets", "5"], "budgets must be >= 10"),
    (["--budgets", "0"], "argument --budgets: expected a positive integer"),
    (["--seeds", "-1"], "argument --seeds: expected an integer >= 0"),
    (["--methods", "bogus"], "argument --methods: invalid choice"),
    (["--steps", "x"], "argument --steps: expected a positive integer"),
    (["--jobs", "0"], "argument --jobs: expected a positive integer"),
    (["--budgets", "1500", "--methods", "onehot"], "budgets: 1500 labelled examples cannot be drawn"),
])
def test_bad_arguments_exit_with_a_message(args, needle, tmp_path, capsys):
    out = tmp_path / "out"
    try:
        code = demo.demo_main([*args, "--out", str(out), "--cache-dir", str(tmp_path)])
    except SystemExit as exc:  # argparse
        code = exc.code
    assert code == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()


def test_splits_are_fixed_disjoint_and_stratified():
    a = demo.load_digits_splits(0)
    b = demo.load_digits_splits(0)
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_train, b.y_train)
    assert a.x_train.min() >= 0 and a.x_train.max() <= 1 and a.x_train.dtype == torch.float32
    rows = {tuple(r) for r in a.x_train.tolist()}
    # the digits data holds a few duplicate images; the splits are disjoint by index, so allow those few
    assert sum(tuple(r) in rows for r in a.x_test.tolist()) < 5
    for y, n in ((a.y_train, 1077), (a.y_val, 270), (a.y_test, 450)):
        assert len(y) == n
        counts = torch.bincount(y, minlength=10).float()
        assert counts.min() >= 0.9 * n / 10 and counts.max() <= 1.1 * n / 10


@pytest.mark.parametrize("n", [10, 20, 25, 100])
def test_few_label_subset_is_stratified_and_seeded(n):
    y = demo.load_digits_splits(0).y_train
    idx = demo.few_label_subset(y, n, seed=3)
    assert len(idx) == n == len(set(idx.tolist()))
    counts = torch.bincount(y[idx], minlength=10)
    assert counts.min() == n // 10 and counts.max() <= n // 10 + 1
    assert torch.equal(idx, demo.few_label_subset(y, n, seed=3))
    assert not torch.equal(idx, demo.few_label_subset(y, n, seed=4))
    with pytest.raises(ValueError, match="n must be at least"):
        demo.few_label_subset(y, 9, seed=0)


def test_teacher_cache_roundtrip_and_key(tmp_path):
    cfg = demo.DemoConfig(labeler_epochs=1, vae_epochs=1)
    splits = demo.load_digits_splits(0)
    logs = []
    t1 = demo.load_or_train_teacher(cfg, splits, str(tmp_path), log=logs.append)
    assert not t1.from_cache and os.path.exists(t1.cache_path)
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []  # written atomically, no leftovers
    t2 = demo.load_or_train_teacher(cfg, splits, str(tmp_path), log=logs.append)
    assert t2.from_cache and t2.metrics == t1.metrics
    for p1, p2 in zip(t1.labeler.parameters(), t2.labeler.parameters()):
        assert torch.equal(p1, p2)
    # another teacher setting is another file
    other = demo.DemoConfig(labeler_epochs=2, vae_epochs=1)
    assert other.teacher_hash() != cfg.teacher_hash()
    assert demo.DemoConfig(steps=1, seeds=(5,)).teacher_hash() == demo.DemoConfig().teacher_hash()
    # a damaged cache file is replaced, not trusted
    with open(t1.cache_path, "wb") as fh:
        fh.write(b"not a checkpoint")
    t3 = demo.load_or_train_teacher(cfg, splits, str(tmp_path), log=logs.append)
    assert not t3.from_cache and any("unreadable" in m for m in logs)
    assert demo.load_or_train_teacher(cfg, splits, str(tmp_path), log=logs.append).from_cache


class _Payload:
    """Unpickling this calls ``open(path, "w")``: a file appears if the cache loader runs pickled code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_teacher_cache_never_runs_pickled_code(tmp_path):
    cfg = demo.DemoConfig(labeler_epochs=1, vae_epochs=1)
    splits = demo.load_digits_splits(0)
    cache = tmp_path / "cache"
    cache.mkdir()
    path = cache / f"teacher-{cfg.teacher_hash()}.pt"
    marker = tmp_path / "pwned"
    torch.save({"key": cfg.teacher_key(), "labeler": _Payload(str(marker)), "vae": {}}, str(path))
    # the payload is live: a plain (not weights-only) load would have created the file
    probe = tmp_path / "probe"
    torch.save(_Payload(str(probe)), str(tmp_path / "probe.pt"))
    torch.load(str(tmp_path / "probe.pt"), weights_only=False)
    assert probe.exists()
    logs = []
    teacher = demo.load_or_train_teacher(cfg, splits, str(cache), log=logs.append)
    assert not marker.exists()  # refused by the weights-only unpickler, not executed
    assert not teacher.from_cache and any("warning" in m and "unreadable" in m for m in logs)
    assert sorted(os.listdir(cache)) == [path.name]  # rewritten atomically, no temporary file left
    assert demo.load_or_train_teacher(cfg, splits, str(cache), log=logs.append).from_cache
    assert not marker.exists()


def test_teacher_parts_are_plain_mlps():
    vae = demo.TeacherVAE(hidden=16, latent=4)
    for part in (vae.encoder, vae.decoder, demo.mlp([64, 8, 10])):
        assert isinstance(part, torch.nn.Sequential)
        assert all(isinstance(m, (torch.nn.Linear, torch.nn.ReLU, torch.nn.Sigmoid)) for m in part)
    x = torch.rand(3, 64)
    mu, logvar = vae.encode(x)
    assert torch.equal(mu, vae.encoder(x)) and logvar.shape == (3, 4)
    out = vae.decoder(mu)
    assert out.shape == (3, 64) and out.min() >= 0 and out.max() <= 1
    assert torch.isfinite(vae.loss(x))


@pytest.mark.parametrize("field, value, match", [
    ("budgets", (), "budgets must not be empty"),
    ("budgets", (5,), "budgets must be >= 10"),
    ("seeds", (1.5,), "seeds must be integers"),
    ("methods", ("kd", "magic"), "methods must be"),
    ("losses", ("mse",), "losses must be"),
    ("steps", 0, "steps must be a positive integer"),
    ("sigma", float("nan"), "sigma must be a positive finite number"),
])
def test_config_validation(field, value, match):
    with pytest.raises((ValueError, TypeError), match=match):
        demo.DemoConfig(**{field: value}).validate()


def test_format_table():
    cfg = demo.DemoConfig(budgets=(20, 50), seeds=(0, 1), methods=("onehot", "kd"), losses=("kl",))
    runs = [{"method": m, "loss": lo, "budget": b, "seed": s, "test_accuracy": a, "val_accuracy": a}
            for (m, lo, b, s, a) in [("onehot", "-", 20, 0, 0.5), ("onehot", "-", 20, 1, 0.7),
                                     ("kd", "kl", 20, 0, 0.8), ("kd", "kl", 20, 1, 0.8),
                                     ("onehot", "-", 50, 0, 0.9), ("onehot", "-", 50, 1, 0.9)]]
    for r in runs:
        r.update(test_ece=r["test_accuracy"] / 10, test_nll=1 - r["test_accuracy"])
    summary = demo.summarise(runs, cfg)
    table = demo.format_table(summary, cfg, {"labeler_test_accuracy": 0.975}, 450, 1077).splitlines()
    assert "mean ± std over 2 seeds" in table[0] and "97.5" in table[1]
    blocks = [i for i, line in enumerate(table) if line.startswith("n = ")]
    assert [table[i] for i in blocks] == ["n = 20 labelled examples", "n = 50 labelled examples"]
    n20 = {tuple(line.split()[:2]): line.split()[2:] for line in table[blocks[0] + 3:blocks[1] - 1]}
    # onehot: 60 ± 14.1; paired differences to kd (0.8 both seeds) -0.3 and -0.1: -20 ± 14.1; ECE 6 ± 1.4
    assert n20[("onehot", "-")] == ["60.0", "±", "14.1", "-20.0", "±", "14.1", "6.0", "±", "1.4", "0.400", "±",
                                    "0.141"]
    assert n20[("kd", "kl")] == ["80.0", "±", "0.0", "-", "8.0", "±", "0.0", "0.200", "±", "0.000"]
    n50 = {tuple(line.split()[:2]): line.split()[2:] for line in table[blocks[1] + 3:]}
    assert n50[("onehot", "-")][3] == "-"  # no kd run at n=50: no paired difference
    assert n50[("kd", "kl")] == ["-", "-", "-", "-"]


def test_train_student_rejects_unknown_method_and_loss():
    x, y = torch.rand(10, 64), torch.arange(10)
    teacher = demo.Teacher(demo.mlp([64, 8, 10]), demo.TeacherVAE(8, 4), {})
    cfg = demo.DemoConfig(steps=1)
    with pytest.raises(ValueError, match="method must be one of"):
        demo.train_student("mixup", "kl", x, y, teacher, cfg, seed=0)
    with pytest.raises(ValueError, match="loss must be one of"):
        demo.train_student("kd", "mse", x, y, teacher, cfg, seed=0)
    with pytest.raises(ValueError, match="needs coeffs"):
        demo.train_student("kd", "ptloss", x, y, teacher, cfg, seed=0)
    with pytest.raises(ValueError, match="needs pool"):
        demo.train_student("real-unlabelled", "kl", x, y, teacher, cfg, seed=0)
    student = demo.train_student("tgt-random", "kl", x, y, teacher, cfg, seed=0)
    assert student(x).shape == (10, 10)
    student = demo.train_student("real-unlabelled", "kl", x, y, teacher, cfg, seed=0, pool=torch.rand(30, 64))
    assert student(x).shape == (10, 10)
