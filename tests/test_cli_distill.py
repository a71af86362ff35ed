"""``tgtfast distill --config FILE.yaml`` end to end on tiny models saved into tmp_path (local files only): it
trains the student as DistillationTrainer does with the same settings, saves it, and refuses bad configs with
an error naming the key."""

import json
import os
import sys

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_tiny as H  # noqa: E402

from tgtfast.cli import distill  # noqa: E402


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(H.V)}, unk_token="w1"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w1", pad_token="w0", eos_token="w2")


LOSS = {"divergence": "skew_kl", "alpha": 0.2, "temperature": 2.0, "ce_weight": 0.5}
TRAINING = {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 0.1, "optim": "sgd",
            "lr_scheduler_type": "constant", "seed": 0, "data_seed": 0, "use_cpu": True, "disable_tqdm": True,
            "save_strategy": "no", "logging_steps": 1, "max_grad_norm": 0.0}


@pytest.fixture
def setup(tmp_path):
    tok = _tokenizer()
    H.llama(seed=0).save_pretrained(tmp_path / "student")
    tok.save_pretrained(tmp_path / "student")
    H.llama(seed=1, hidden=48).save_pretrained(tmp_path / "teacher")
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(f"w{int(i)}" for i in torch.randint(3, H.V, (int(n),), generator=g))
             for n in torch.randint(5, 12, (8,), generator=g)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": x}) + "\n" for x in lines))
    (tmp_path / "val.txt").write_text("\n".join(lines[:3]) + "\n")
    cfg = {"student": "student", "teacher": "teacher", "data": {"train": "train.jsonl", "eval": "val.txt",
           "max_length": 16}, "loss": dict(LOSS), "training": dict(TRAINING, output_dir=str(tmp_path / "out"))}
    return tmp_path, cfg, lines


def _write(tmp_path, cfg):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_distill_end_to_end_matches_the_trainer(setup, capsys):
    from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling

    from tgtfast.integrations.transformers import DistillationTrainer

    tmp_path, cfg, lines = setup
    assert distill.main(["--config", _write(tmp_path, cfg)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and "eval_kd_loss" in summary and summary["kd_loss"] > 0
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True).state_dict()

    tok = _tokenizer()
    enc = tok(lines, truncation=True, max_length=16)
    data = [{"input_ids": i, "attention_mask": m} for i, m in zip(enc["input_ids"], enc["attention_mask"])]
    student, teacher = H.llama(seed=0), H.llama(seed=1, hidden=48)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    collator = DataCollatorForLanguageModeling(tok, mlm=False)
    DistillationTrainer(student, H.args(tmp_path / "direct", **TRAINING), collator, data, teacher_model=teacher,
                        **LOSS).train()
    assert any(not torch.equal(trained[k], before[k]) for k in before)
    for k, v in student.state_dict().items():
        torch.testing.assert_close(trained[k], v, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_distill_builds_models_from_configs_with_lora(setup, capsys):
    pytest.importorskip("peft")
    tmp_path, cfg, _ = setup
    cfg.update(teacher={"config": {"model_type": "gpt2", "vocab_size": H.V, "n_embd": 32, "n_layer": 1,
                                   "n_head": 4}},
               lora={"r": 2, "target_modules": ["q_proj"]})
    cfg["training"]["max_steps"] = 1
    cfg["data"].pop("eval")
    assert distill.main(["--config", _write(tmp_path, cfg), "--out", str(tmp_path / "lora")]) == 0
    assert os.path.isfile(tmp_path / "lora" / "adapter_model.safetensors")


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(extra=1), "unknown key"),
    (lambda c: c["loss"].update(divergence="kl"), "divergence must be one of"),
    (lambda c: c["loss"].update(gamma=1), "under loss"),
    (lambda c: c["training"].update(not_a_field=1), "training"),
    (lambda c: c.update(teacher="missing"), "teacher: no such file"),
    (lambda c: c.update(teacher={"config": {"model_type": "llama", "vocab_size": H.V + 4, "hidden_size": 32,
                                            "intermediate_size": 64, "num_hidden_layers": 1,
                                            "num_attention_heads": 4}}), f"{H.V} rows.*{H.V + 4}"),
])
def test_distill_refuses_bad_configs(setup, capsys, change, message):
    import re

    tmp_path, cfg, _ = setup
    change(cfg)
    assert distill.main(["--config", _write(tmp_path, cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("tgtfast distill: error:") and re.search(message, err), err


def test_distill_from_a_teacher_cache(setup, capsys):
    """`tgtfast cache-teacher` over data.train, then `tgtfast distill` with teacher_cache instead of a teacher:
    the same weights as DistillationTrainer on the cached dataset and collator."""
    from transformers import AutoModelForCausalLM

    from tgtfast.cache import CachedTeacherDataset, TeacherCache, TeacherCollator
    from tgtfast.cli import cache_teacher
    from tgtfast.integrations.transformers import DistillationTrainer

    tmp_path, cfg, lines = setup
    _tokenizer().save_pretrained(tmp_path / "teacher")
    assert cache_teacher.main(["--model", str(tmp_path / "teacher"), "--data", str(tmp_path / "train.jsonl"),
                               "--k", "8", "--out", str(tmp_path / "cache"), "--max-length", "16",
                               "--dtype", "float32", "--device", "cpu", "--no-progress"]) == 0
    cfg.pop("teacher")
    cfg["data"].pop("eval")
    cfg["teacher_cache"] = "cache"
    assert distill.main(["--config", _write(tmp_path, cfg)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["kd_loss"] > 0
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True).state_dict()

    tok = _tokenizer()
    enc = tok(lines, truncation=True, max_length=16)
    cache = TeacherCache(str(tmp_path / "cache"))
    data = CachedTeacherDataset([{"input_ids": i, "attention_mask": m}
                                 for i, m in zip(enc["input_ids"], enc["attention_mask"])], cache)
    student = H.llama(seed=0)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    DistillationTrainer(student, H.args(tmp_path / "direct", **TRAINING), TeacherCollator(cache, pad_token_id=0),
                        data, teacher_model=None, **LOSS).train()
    assert any(not torch.equal(trained[k], before[k]) for k in before)
    for k, v in student.state_dict().items():
        torch.testing.assert_close(trained[k], v, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")

    cfg["teacher"] = "teacher"  # both: refused
    assert distill.main(["--config", _write(tmp_path, cfg)]) == 2
    assert "exactly one of 'teacher'" in capsys.readouterr().err
