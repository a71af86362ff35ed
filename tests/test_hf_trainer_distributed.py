"""DistillationTrainer with 2 gloo processes on the CPU, launched by torchrun:

* DDP through Trainer.train(): one optimiser step over 4 examples (per-device batch 1, 2 accumulation steps)
  equals one process taking them as one batch of 4 (same parameters after the step, same logged losses): the
  loss tokens are counted over accumulation steps and processes.
* torch's FSDP2 (``fully_shard`` on the decoder layers and the root; the output projection a DTensor): the
  trainer's loss and gradients equal one process's. accelerate refuses FSDP without an accelerator device, so
  Trainer.train() under FSDP is not run here.
"""

import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import hf_tiny as H  # noqa: E402
import hf_trainer_script as S  # noqa: E402


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """One torchrun launch running both modes (the processes' start-up dominates the time)."""
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "hf_trainer_script.py"), str(out), "ddp,fsdp2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")
    r = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    return out


def _load(out):
    from safetensors.torch import load_file

    return load_file(str(out / "params.safetensors")), json.loads((out / "logs.json").read_text())


def _assert_close(got, want):
    assert got.keys() == want.keys() and want
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_ddp_two_processes_equal_one(tmp_path, launched):
    torch.set_num_threads(1)
    got, ddp = _load(launched / "ddp")
    assert ddp["wrapped"] == "DistributedDataParallel" and ddp["teacher"] == "LlamaForCausalLM"
    one = tmp_path / "one"
    one.mkdir()
    S.trainer_step(str(one), "one")
    want, single = _load(one)
    assert any(not torch.equal(want[k], v) for k, v in S.models()[0].state_dict().items())
    _assert_close(got, want)
    for key in ("loss", "kd_loss", "ce_loss", "grad_norm"):
        assert math.isclose(ddp["logs"][0][key], single["logs"][0][key], rel_tol=1e-5), key


def test_fsdp2_sharded_student_equals_one_process(tmp_path, launched):
    torch.set_num_threads(1)
    got, meta = _load(launched / "fsdp2")
    assert meta["projection"] == "DTensor"  # sharded outside the forward: the loss ran inside it
    student, teacher = S.models()
    tr = S.DistillationTrainer(student, H.args(tmp_path / "one"), H.collate, teacher_model=teacher, **S.LOSS)
    loss = tr.compute_loss(student, H.collate(H.examples(4)))
    loss.backward()
    assert math.isclose(meta["loss"], float(loss.detach()), rel_tol=1e-5)
    _assert_close(got, {n: p.grad for n, p in student.named_parameters()})
