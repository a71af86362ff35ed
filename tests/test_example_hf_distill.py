"""examples/hf_distill.py runs end to end in its quick mode and writes its results (the numbers are not checked:
they depend on the machine's arithmetic and say nothing at this size)."""

import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "hf_distill.py")


def _run(out, *extra):
    env = dict(os.environ, TGTFAST_QUIET="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, EXAMPLE, "--quick", "--out", str(out), *extra], capture_output=True,
                          text=True, timeout=600, env=env, cwd=str(out))


def test_quick_run_writes_results_and_reuses_the_teacher(tmp_path):
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["summary"]) == {"teacher", "student_ce", "student_kd", "student_ce_long"}
    for row in results["summary"].values():
        assert math.isfinite(row["test_loss"]["mean"]) and row["test_loss"]["mean"] > 0
    assert results["teacher"]["cached"] is False
    assert len(results["grid"]) >= 2
    chosen = results["chosen"]
    best = min(results["grid"], key=lambda r: r["validation"]["loss"])
    assert (chosen["kd_weight"], chosen["ce_weight"], chosen["temperature"]) == (
        best["kd_weight"], best["ce_weight"], best["temperature"])
    # perplexity is exp(loss) of the same evaluation
    teacher = results["teacher"]["test"]
    assert teacher["perplexity"] == pytest.approx(math.exp(teacher["loss"]), rel=1e-9)
    assert "| student with KD" in proc.stdout

    # a rerun loads the saved teacher (and its tokenizer) and scores it the same
    again = _run(tmp_path, "--json", str(tmp_path / "again.json"))
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = json.loads((tmp_path / "again.json").read_text())
    assert rerun["teacher"]["cached"] is True
    assert rerun["teacher"]["test"]["loss"] == pytest.approx(teacher["loss"], rel=1e-6)


def test_bad_sizes_are_refused(tmp_path):
    proc = _run(tmp_path, "--student-steps", "0")
    assert proc.returncode != 0
    assert "--student-steps" in proc.stderr
