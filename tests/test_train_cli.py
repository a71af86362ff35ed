"""``tgtfast train --config FILE.yaml``: end to end on a tiny problem, and its errors."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from tgtfast.train import TGTConfig
from tgtfast.cli.train import CONFIG_KEYS, LOSS_KEYS, help_config, main as train_main

FACTORIES = '''
import torch
from torch import nn

D, LATENT, K = 6, 3, 4


def make_student(hidden=8):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, hidden), nn.ReLU(), nn.Linear(hidden, K))


def make_labeler():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, K))


def make_encoder():
    torch.manual_seed(2)
    return nn.Linear(D, LATENT)


def make_decoder():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(LATENT, 16), nn.ReLU(), nn.Linear(16, D))


def make_data(n=40):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(n, D, generator=g)
    y = make_labeler()(x).argmax(1).detach()
    rows = [{"x": x[i], "y": y[i]} for i in range(n)]
    return {"train": rows[:30], "val": rows[30:]}


def to_xy(batch):
    return batch["x"], batch["y"]
'''

CONFIG = """
student: {{factory: "tiny_factories:make_student", args: {{hidden: 12}}}}
labeler: tiny_factories:make_labeler
encoder: tiny_factories:make_encoder
decoder: tiny_factories:make_decoder
data: tiny_factories:make_data
batch_fn: tiny_factories:to_xy
loss: {loss}
train:
  exploration: {mode}
  sigma: 0.5
  batch_size: 8
  epochs: 20
  lr: 0.01
  log_every: 1
  out_dir: out
  progress: false
"""


def write(tmp_path, mode="random", loss="{name: ptloss, temperature: 2.0, coeffs: [0.3, -0.1]}", extra=""):
    (tmp_path / "tiny_factories.py").write_text(FACTORIES)
    path = tmp_path / "run.yaml"
    path.write_text(CONFIG.format(mode=mode, loss=loss) + extra)
    return str(path)


def test_quick_end_to_end(tmp_path, capsys, monkeypatch):
    """The real console command, in a subprocess, with --quick: 5 steps, files written, JSON summary printed."""
    cfg = write(tmp_path, mode="gradient")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")
    console = "import sys; from tgtfast.cli import main; sys.exit(main())"  # what the `tgtfast` script runs
    r = subprocess.run([sys.executable, "-c", console, "train", "--config", cfg, "--quick"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 5 and 0.0 <= summary["val_acc"] <= 1.0 and summary["tgt"] > 0
    out = tmp_path / "out"
    assert summary["out_dir"] == str(out)
    lines = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert [l["step"] for l in lines if "loss" in l] == [1, 2, 3, 4, 5]
    assert (out / "checkpoint.pt").exists()
    if importlib.util.find_spec("matplotlib") is not None:  # the plot is optional
        assert (out / "curves.png").stat().st_size > 1000
    # a second run refuses to replace the saved one (in this process, through the same entry point)
    monkeypatch.chdir(tmp_path)
    before = (out / "checkpoint.pt").read_bytes()
    from tgtfast.cli import main

    assert main(["train", "--config", cfg, "--quick"]) == 2
    assert "resume=True" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == before


def test_in_process_training_learns_and_resumes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = write(tmp_path, loss="{name: kl}", extra="  max_steps: 40\n")
    assert train_main(["--config", cfg]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 40 and summary["val_acc"] >= 0.6  # the student follows a 4-class teacher
    # resuming a finished run trains no further and keeps the result
    assert train_main(["--config", cfg, "--resume"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["steps"] == 40 and again["loss"] == summary["loss"]


@pytest.mark.parametrize(
    "extra, loss, message",
    [
        ("  bacth_size: 8\n", "{name: kl}", "unknown config key.*bacth_size"),
        ("  max_steps: two\n", "{name: kl}", "config.max_steps must be an int"),
        ("", "{name: kl, coefs: [1]}", "unknown key.*coefs.*under loss"),
        ("", "{name: kl, gamma: 2.0}", "do not apply to loss.name 'kl'"),
        ("", "{name: hinge}", "loss.name must be one of"),
        ("", "{name: ptloss, coeffs: missing.json}", "no such file"),
        ("", "{name: focal, gamma: high}", "loss.gamma must be a real number"),
        ("optimiser: sgd\n", "{name: kl}", "unknown key.*optimiser"),
    ],
)
def test_config_errors(tmp_path, capsys, monkeypatch, extra, loss, message):
    monkeypatch.chdir(tmp_path)
    cfg = write(tmp_path, loss=loss, extra=extra)
    assert train_main(["--config", cfg, "--quick"]) == 2
    err = capsys.readouterr().err
    assert "tgtfast train: error:" in err
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()  # nothing written before the error


def test_factory_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = write(tmp_path)
    text = open(cfg).read().replace("tiny_factories:make_decoder", "tiny_factories:make_nothing")
    open(cfg, "w").write(text)
    assert train_main(["--config", cfg]) == 2
    assert "has no callable 'make_nothing'" in capsys.readouterr().err
    open(cfg, "w").write(text.replace("tiny_factories:make_nothing", "nowhere:make"))
    assert train_main(["--config", cfg]) == 2
    assert "cannot import module 'nowhere'" in capsys.readouterr().err


def test_help_config_documents_every_key(capsys):
    assert train_main(["--help-config"]) == 0
    text = capsys.readouterr().out
    assert text == help_config() + "\n"
    for key in list(CONFIG_KEYS) + list(LOSS_KEYS) + list(TGTConfig.__dataclass_fields__):
        assert f"  {key}" in text, key


def test_ptloss_coefficients_from_the_proxy_teacher(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = write(tmp_path, loss="{name: ptloss, coeffs: search, order: 2, num_candidates: 4}")
    assert train_main(["--config", cfg, "--quick"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 5
    ckpt = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    # the searched coefficients are part of the run's identity: another loss cannot resume it
    text = open(cfg).read().replace("coeffs: search, order: 2, num_candidates: 4", "coeffs: [0.0, 0.0]")
    open(cfg, "w").write(text)
    assert train_main(["--config", cfg, "--quick", "--resume"]) == 2
    assert "another configuration" in capsys.readouterr().err
    assert torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)["step"] == ckpt["step"]
