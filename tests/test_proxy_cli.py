"""``tgtfast coeffs`` (tgtfast/cli/coeffs.py): the output path is checked before the search, and no input file is
unpickled beyond tensors; every refusal is one line on stderr naming the argument and the file, exit status 2."""

import collections
import json
import os
import pathlib
import pickle

import numpy as np
import pytest
import torch

import tgtfast.proxy.search
from tgtfast import proxy
from tgtfast.cli import coeffs

F64 = torch.float64
MAIN = coeffs.main


class _Payload:
    """Unpickling this touches `path`: the proof that a file was loaded with arbitrary unpickling."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


@pytest.fixture
def files(tmp_path):
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(60, 3, generator=g, dtype=F64) * 2, -1)
    y = torch.multinomial(p.float(), 1, generator=g)[:, 0]
    torch.save(p, tmp_path / "pred.pt")
    np.save(tmp_path / "labels.npy", y.numpy())
    return tmp_path


def _args(files, out, teacher="pred.pt", labels="labels.npy"):
    return ["--teacher", str(files / teacher), "--labels", str(files / labels), "--num-candidates", "3",
            "--order", "2", "--out", str(out)]


@pytest.fixture
def no_search(monkeypatch):
    """Fails the test if the search runs (a refusal must come before it)."""
    def refuse(*a, **k):
        raise AssertionError("search_coefficients ran although the command line was bad")

    monkeypatch.setattr(tgtfast.proxy.search, "search_coefficients", refuse)


def _refused(rc, capsys, *words):
    captured = capsys.readouterr()
    assert rc == 2, captured
    err = captured.err.strip()
    assert err.startswith("tgtfast coeffs: error:") and "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert str(w) in err, (w, err)
    return err


def test_out_in_missing_directory_is_refused_before_the_search(files, capsys, no_search):
    out = files / "no" / "such" / "dir" / "c.json"
    rc = MAIN(_args(files, out))
    _refused(rc, capsys, "--out", "does not exist", files / "no" / "such" / "dir")
    assert not out.exists()


def test_out_that_is_a_directory_is_refused_before_the_search(files, capsys, no_search):
    rc = MAIN(_args(files, files))
    _refused(rc, capsys, "--out", "is a directory")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can write anywhere")
def test_out_in_unwritable_directory_is_refused_before_the_search(files, capsys, no_search):
    ro = files / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        rc = MAIN(_args(files, ro / "c.json"))
    finally:
        ro.chmod(0o700)
    _refused(rc, capsys, "--out", ro)


def test_good_out_still_written(files, capsys):
    out = files / "c.json"
    assert MAIN(_args(files, out)) == 0
    saved = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out)["coeffs"] == saved["coeffs"]
    # the old entry point is the same command
    assert proxy.coeffs_main is coeffs.main


@pytest.mark.parametrize("which", ["teacher", "labels"])
def test_pickled_pt_is_refused_clearly_and_never_unpickled(files, capsys, which):
    marker = files / "pwned"
    bad = files / "bad.pt"
    torch.save({"x": torch.zeros(3), "obj": _Payload(marker)}, bad)
    kw = {which: "bad.pt"}
    rc = MAIN(_args(files, files / "c.json", **kw))
    _refused(rc, capsys, f"--{which}", bad, "weights_only=True")
    assert not marker.exists(), "the file was unpickled with arbitrary objects"
    # a plain pickle (not a torch.save zip) of an object
    with open(bad, "wb") as fh:
        pickle.dump(collections.Counter(a=1), fh)
    rc = MAIN(_args(files, files / "c.json", **kw))
    _refused(rc, capsys, f"--{which}", bad)


def test_object_npy_is_refused_clearly(files, capsys):
    bad = files / "obj.npy"
    np.save(bad, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    rc = MAIN(_args(files, files / "c.json", labels="obj.npy"))
    _refused(rc, capsys, "--labels", bad, "object array")


@pytest.mark.parametrize("content", [b"", b"not a zip file nor a pickle"])
def test_unreadable_files_are_refused_clearly(files, capsys, content):
    for name in ("junk.pt", "junk.npy"):
        (files / name).write_bytes(content)
        rc = MAIN(_args(files, files / "c.json", teacher=name))
        _refused(rc, capsys, "--teacher", files / name)


def test_missing_file_and_several_tensors_are_refused_clearly(files, capsys):
    rc = MAIN(_args(files, files / "c.json", teacher="absent.pt"))
    _refused(rc, capsys, "--teacher", files / "absent.pt", "does not exist")
    torch.save({"a": torch.zeros(2), "b": torch.zeros(2)}, files / "two.pt")
    rc = MAIN(_args(files, files / "c.json", teacher="two.pt"))
    _refused(rc, capsys, "--teacher", "single tensor", "'a'", "'b'")
