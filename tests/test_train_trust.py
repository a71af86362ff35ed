"""Trust fixes of training: checkpoints never unpickle code, a config's folder never shadows installed modules,
every label is checked before the first step, clear errors (exit code 2, no traceback) for broken factories and
checkpoints, command-line overrides before validation, and no temporaries left by killed runs."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from tgtfast.cli.train import help_config, load_config, main as train_main
from tgtfast.train import TGTConfig, TGTTrainer
from tgtfast.train import checkpoint as ckpt

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from test_train_cli import write as write_config  # noqa: E402

SCRIPT = os.path.join(HERE, "trainer_script.py")
N, D, LATENT, K = 24, 6, 3, 4


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def models():
    torch.manual_seed(11)
    labeler = nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, K))
    encoder = nn.Linear(D, LATENT)
    decoder = nn.Sequential(nn.Linear(LATENT, 16), nn.ReLU(), nn.Linear(16, D))
    torch.manual_seed(5)
    student = nn.Sequential(nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, K))
    return student, labeler, decoder, encoder


def data():
    g = torch.Generator().manual_seed(3)
    return torch.randn(N, D, generator=g), torch.randint(0, K, (N,), generator=g)


def trainer(cfg):
    student, labeler, decoder, encoder = models()
    return TGTTrainer(student, labeler, decoder=decoder, encoder=encoder, config=cfg)


def fit(cfg, d=None):
    return trainer(cfg).fit(data() if d is None else d)


def cfg_for(out_dir, **kw):
    base = dict(exploration="random", batch_size=8, max_steps=3, out_dir=str(out_dir), plot=False, progress=False)
    base.update(kw)
    return TGTConfig(**base)


class _CreatesFile:
    """Unpickling this calls open(path, "w"): the file appears if the pickle runs."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _cli(cfg, *args):
    """``tgtfast train`` in this process: (exit code, stderr)."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = train_main(["--config", cfg, *args])
    return code, err.getvalue()


def _replace(path, old, new):
    text = open(path).read()
    assert old in text
    open(path, "w").write(text.replace(old, new))


def _edit_checkpoint(path, edit):
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


# ----------------------------------------------------------------------------------------------------- 1 pickles


def test_checkpoint_holding_a_pickle_payload_is_refused_and_not_run(tmp_path):
    out, marker = tmp_path / "out", tmp_path / "pwned"
    fit(cfg_for(out))
    torch.save({"fingerprint": _CreatesFile(marker), "step": 1}, out / "checkpoint.pt")
    with pytest.raises(ValueError, match="refusing to load the checkpoint .*could run code"):
        fit(cfg_for(out, resume=True))
    assert not marker.exists()


def test_cli_resume_refuses_a_pickle_payload(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path, loss="{name: kl}")
    marker = tmp_path / "pwned"
    assert _cli(cfg, "--quick")[0] == 0
    torch.save({"fingerprint": _CreatesFile(marker)}, tmp_path / "out" / "checkpoint.pt")
    code, err = _cli(cfg, "--quick", "--resume")
    assert code == 2 and "refusing to load the checkpoint" in err and "Traceback" not in err
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------- 2 sys.path


def test_module_beside_the_config_does_not_shadow_installed_packages(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "work").mkdir()
    cfg = write_config(tmp_path / "cfg", loss="{name: kl}")
    marker = tmp_path / "shadowed"
    (tmp_path / "cfg" / "matplotlib.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")
    r = subprocess.run([sys.executable, "-c", "import sys; from tgtfast.cli.train import main; sys.exit(main())",
                        "--config", cfg, "--quick"], cwd=tmp_path / "work", env=env, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stderr
    assert not marker.exists()  # the installed matplotlib drew the curves
    assert (tmp_path / "work" / "out" / "curves.png").stat().st_size > 1000


def test_factory_module_named_like_an_installed_module_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path, loss="{name: kl}")
    (tmp_path / "json.py").write_text("def make_data():\n    raise SystemExit('must not run')\n")
    _replace(cfg, "data: tiny_factories:make_data", "data: json:make_data")
    code, err = _cli(cfg, "--quick")
    assert code == 2 and "has the name of an installed module" in err and "never shadow" in err
    assert json.dumps is not None and json.__file__ != str(tmp_path / "json.py")


# ----------------------------------------------------------------------------------------------------- 3 docs


def test_help_and_loader_say_that_a_config_runs_code():
    assert "A config runs code" in help_config()
    assert "runs code" in load_config.__doc__ and "Hydra" in load_config.__doc__


# ----------------------------------------------------------------------------------------------------- 4 labels


def test_bad_label_far_in_the_training_set_is_named_before_training(tmp_path):
    x, y = data()
    y[17] = K
    steps = []
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\) or -100 .*training example 17 has label 4"):
        trainer(cfg_for(tmp_path / "out")).fit((x, y), callback=lambda t, r: steps.append(r))
    assert steps == [] and not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="training example 17 has label -3"):  # also without the teacher cache
        y[17] = -3
        trainer(cfg_for(tmp_path / "out", cache_teacher=False)).fit((x, y))


def test_cli_bad_label_exits_2_without_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path, loss="{name: kl}")
    src = (tmp_path / "tiny_factories.py").read_text()
    src = src.replace('    rows = [{"x": x[i], "y": y[i]} for i in range(n)]',
                      '    y[17] = 4\n    rows = [{"x": x[i], "y": y[i]} for i in range(n)]')
    (tmp_path / "tiny_factories.py").write_text(src)
    code, err = _cli(cfg, "--quick")
    assert code == 2 and "training example 17 has label 4" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------------- 5 errors


def test_cli_factory_that_raises_exits_2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path, loss="{name: kl}")
    with open(tmp_path / "tiny_factories.py", "a") as fh:
        fh.write("\n\ndef broken():\n    raise RuntimeError('no data today')\n")
    _replace(cfg, "data: tiny_factories:make_data", "data: tiny_factories:broken")
    code, err = _cli(cfg, "--quick")
    assert code == 2 and "data: calling tiny_factories:broken(**{}) raised RuntimeError: no data today" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("entry", ["student", "rng"])
def test_cli_checkpoint_missing_an_entry_exits_2(tmp_path, monkeypatch, entry):
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path, loss="{name: kl}")
    assert _cli(cfg, "--quick")[0] == 0
    path = tmp_path / "out" / "checkpoint.pt"
    _edit_checkpoint(path, lambda s: s.pop(entry))
    before = path.read_bytes()
    code, err = _cli(cfg, "--quick", "--resume")
    assert code == 2 and f"has no '{entry}' entry" in err and "Traceback" not in err
    assert path.read_bytes() == before


def test_checkpoint_step_beyond_the_run_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path, loss="{name: kl}")
    assert _cli(cfg, "--quick")[0] == 0
    path = tmp_path / "out" / "checkpoint.pt"
    _edit_checkpoint(path, lambda s: s.update(step=999))
    before = path.read_bytes()
    code, err = _cli(cfg, "--quick", "--resume")
    assert code == 2 and "is at step 999, outside this run's 0..5 steps" in err and "Traceback" not in err
    assert path.read_bytes() == before
    _edit_checkpoint(path, lambda s: s.update(step=4))  # within the run, but not where its schedule stopped
    code, err = _cli(cfg, "--quick", "--resume")
    assert code == 2 and "counters disagree: step 4 but the learning-rate schedule is at step 5" in err


# ----------------------------------------------------------------------------------------------------- 6 overrides


def test_out_on_the_command_line_satisfies_checkpoint_every(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path, loss="{name: kl}", extra="  max_steps: 4\n  checkpoint_every: 2\n")
    _replace(cfg, "  out_dir: out\n", "")
    code, err = _cli(cfg)
    assert code == 2 and "need config.out_dir" in err  # without --out the config is still refused
    code, err = _cli(cfg, "--out", "elsewhere")
    assert code == 0, err
    assert torch.load(tmp_path / "elsewhere" / "checkpoint.pt", weights_only=True)["step"] == 4


# ----------------------------------------------------------------------------------------------------- 7 temporaries


def _dead_pid():
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(p.stdout)


def test_stale_temporaries_of_the_run_are_removed_at_start(tmp_path):
    out = tmp_path / "out"
    fit(cfg_for(out, checkpoint_every=1))
    saved = {name: (out / name).read_bytes() for name in ("checkpoint.pt", "metrics.jsonl")}
    host = ckpt._host()
    stale = [f".checkpoint.pt.tmp-{host}-{_dead_pid()}-abc_12.tmp", ".checkpoint.pt.k3j4h5g6.tmp",
             f".metrics.jsonl.tmp-{host}-{_dead_pid()}-zz.tmp", ".checkpoint.pt.tmp-otherhost-12-old.tmp"]
    kept = [f".checkpoint.pt.tmp-{host}-{os.getpid()}-live.tmp",  # a live writer (this process)
            ".checkpoint.pt.tmp-otherhost-12-new.tmp",  # another machine, written just now
            ".other.pt.k3j4h5g6.tmp", "notes.txt", "checkpoint.pt.bak"]
    for name in stale + kept:
        (out / name).write_bytes(b"x" * 1000)
    old = os.path.getmtime(out / stale[-1]) - 3600
    os.utime(out / stale[-1], (old, old))
    with pytest.raises(ValueError, match="resume=True"):  # a refused run touches nothing
        fit(cfg_for(out))
    assert all((out / name).exists() for name in stale)
    fit(cfg_for(out, resume=True, checkpoint_every=1))  # the finished run: nothing more to train
    left = set(os.listdir(out))
    assert not left & set(stale)
    assert set(kept) <= left
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 3 and (out / "metrics.jsonl").read_bytes() == saved["metrics.jsonl"]


def test_run_killed_while_saving_leaves_a_temporary_that_the_resumed_run_removes(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")
    r = subprocess.run([sys.executable, SCRIPT, str(out), str(tmp_path / "r.pt"), "--kill-in-save", "6"], env=env,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == -9, r.stderr
    orphans = [f for f in os.listdir(out) if f.startswith(".checkpoint.pt.") and f.endswith(".tmp")]
    assert len(orphans) == 1  # the half-written checkpoint of step 6
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3  # what was saved is intact
    r = subprocess.run([sys.executable, SCRIPT, str(out), str(tmp_path / "r.pt"), "--resume"], env=env,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "history.json", "metrics.jsonl"]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 8
