"""``tgtfast distill --config FILE.yaml``: distil a Hugging Face causal LM into another with
:class:`tgtfast.integrations.transformers.DistillationTrainer`, from local files only (nothing is downloaded).

::

    # tgtfast distill --config run.yaml
    student: models/student        # a save_pretrained folder, or {config: {model_type: llama, ...}} (random init)
    teacher: models/teacher        # a save_pretrained folder (or a config, for trials)
    # teacher_cache: teacher-cache # or, instead of `teacher`: a `tgtfast cache-teacher` folder of the same data.train
    tokenizer: models/student      # the student's tokenizer folder (default: the student's folder)
    teacher_tokenizer: models/teacher  # optional: checked against the student's vocabulary
    dtype: bfloat16                # optional: float32 (default), bfloat16 or float16, for both models
    data:
      train: data/train.jsonl      # .jsonl (one JSON object per line, text under `field`) or a text file (a line each)
      eval: data/val.txt           # optional
      field: text                  # default text
      max_length: 512              # tokens per example (truncated), default 512
    loss:
      divergence: jsd              # any of tgtfast.DIVERGENCES
      beta: 0.5                    # the divergence's parameters: beta, alpha, lam, t
      temperature: 2.0
      kd_weight: 1.0
      ce_weight: 0.5
      t2_scaling: false
      vocab_mismatch: error        # error | slice | pad
    lora: {r: 8, lora_alpha: 16, target_modules: [q_proj, v_proj]}   # optional: a PEFT LoRA student (peft.LoraConfig)
    training:                      # transformers.TrainingArguments fields (report_to defaults to none)
      output_dir: runs/distilled
      max_steps: 1000
      per_device_train_batch_size: 8
      learning_rate: 2.0e-5

Paths are relative to the config file's folder (``output_dir`` to the working directory, as in ``tgtfast train``).
Models and tokenizers load with ``local_files_only=True`` and ``trust_remote_code=False``: no network, no code
from the model folders. Unknown keys anywhere are an error naming the key. Under ``torchrun`` every process runs
the command (Trainer's data parallelism). The student is saved in ``output_dir`` at the end; the last line printed
is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

from tgtfast.cli.train import ConfigError, read_yaml

__all__ = ["main", "CONFIG_KEYS", "DATA_KEYS", "LOSS_KEYS", "load_config", "help_config"]

CONFIG_KEYS = {
    "student": "the student: a save_pretrained folder, or {config: {model_type: ..., ...}} to build with random "
               "weights (required)",
    "teacher": "the teacher: a save_pretrained folder or {config: {...}} (this or teacher_cache is required)",
    "teacher_cache": "instead of a live teacher: a `tgtfast cache-teacher` folder made from data.train with the "
                     "same tokenizer and max_length (each example's tokens are checked against it)",
    "tokenizer": "the student's tokenizer folder (default: the student's folder)",
    "teacher_tokenizer": "the teacher's tokenizer folder (optional; a different vocabulary is refused)",
    "dtype": "float32 (default), bfloat16 or float16: the dtype both models are loaded in",
    "data": "the training text (required); keys below",
    "loss": "the distillation loss; keys below",
    "lora": "optional peft.LoraConfig fields: train a LoRA adapter of the student",
    "training": "transformers.TrainingArguments fields (report_to defaults to none)",
}
DATA_KEYS = {
    "train": "a .jsonl file (one JSON object per line, the text under `field`) or a text file (one example a line)",
    "eval": "optional evaluation file, same forms",
    "field": "the text field of .jsonl lines (default text)",
    "max_length": "tokens per example, longer ones truncated (default 512)",
}
LOSS_KEYS = {
    "divergence": "forward_kl (default), reverse_kl, jsd, skew_kl, skew_reverse_kl, tvd, symmetric_kl, "
                  "ab_divergence or taid",
    "beta": "the divergence's beta (jsd, ab_divergence)",
    "alpha": "the divergence's alpha (skew_kl, skew_reverse_kl, ab_divergence)",
    "lam": "the divergence's lam (symmetric_kl)",
    "t": "the divergence's t (taid)",
    "temperature": "loss temperature (> 0), default 1.0",
    "kd_weight": "weight of the divergence, default 1.0",
    "ce_weight": "weight of the cross-entropy on the labels, default 0.0",
    "t2_scaling": "multiply the divergence by temperature**2, default false",
    "vocab_mismatch": "error (default), slice or pad: student and teacher with different vocabulary sizes",
}
_DTYPES = ("float32", "bfloat16", "float16")


def help_config() -> str:
    """The documentation of every config key."""
    out = ["Top-level keys:"] + [f"  {k}: {v}" for k, v in CONFIG_KEYS.items()]
    out += ["data keys:"] + [f"  {k}: {v}" for k, v in DATA_KEYS.items()]
    out += ["loss keys:"] + [f"  {k}: {v}" for k, v in LOSS_KEYS.items()]
    return "\n".join(out)


def _mapping(value: Any, key: str, known: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be a mapping, got {type(value).__name__}")
    if known is not None:
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} under {key}; known: {list(known)}")
    return value


def load_config(path: str) -> Dict[str, Any]:
    """Read the YAML file (``yaml.safe_load``) and check its keys."""
    cfg = _mapping(read_yaml(path), path, CONFIG_KEYS)
    for key in ("student", "data"):
        if key not in cfg:
            raise ConfigError(f"{path} needs a '{key}' entry ({CONFIG_KEYS[key]})")
    if ("teacher" in cfg) == ("teacher_cache" in cfg):
        raise ConfigError(f"{path} needs exactly one of 'teacher' (a live teacher) and 'teacher_cache' (its cached "
                          "top-k outputs)")
    _mapping(cfg["data"], "data", DATA_KEYS)
    if "train" not in cfg["data"]:
        raise ConfigError("data needs a 'train' file")
    _mapping(cfg.get("loss"), "loss", LOSS_KEYS)
    _mapping(cfg.get("training"), "training")
    _mapping(cfg.get("lora"), "lora")
    loss = cfg.get("loss") or {}
    try:  # before any model loads: the divergence and its parameters
        from tgtfast.losses.divergence import resolve

        resolve(loss.get("divergence", "forward_kl"), **{k: loss.get(k) for k in ("beta", "alpha", "lam", "t")})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"loss: {exc}") from None
    if cfg.get("dtype", "float32") not in _DTYPES:
        raise ConfigError(f"dtype must be one of {list(_DTYPES)}, got {cfg.get('dtype')!r}")
    return cfg


def _path(value: Any, key: str, base_dir: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key} must be a path, got {value!r}")
    path = value if os.path.isabs(value) else os.path.join(base_dir, value)
    if not os.path.exists(path):
        raise ConfigError(f"{key}: no such file or folder {path!r}")
    return path


def _model(spec: Any, key: str, base_dir: str, dtype: Any):
    """A causal LM from a save_pretrained folder (local files only) or from a config mapping (random weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(spec, dict):
        _mapping(spec, key, {"config": "the model's config fields, with model_type"})
        fields = dict(_mapping(spec.get("config"), f"{key}.config"))
        model_type = fields.pop("model_type", None)
        if not isinstance(model_type, str):
            raise ConfigError(f"{key}.config needs a model_type (e.g. llama, gpt2)")
        try:
            config = AutoConfig.for_model(model_type, **fields)
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"{key}.config: {exc}") from None
    path = _path(spec, key, base_dir)
    try:
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, trust_remote_code=False,
                                                    dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}: cannot load a causal LM from {path}: {exc}") from None


def _tokenizer(path: str, key: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}: cannot load a tokenizer from {path}: {exc}") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ConfigError(f"{key}: the tokenizer has neither a pad nor an eos token to pad batches with")
        tok.pad_token = tok.eos_token
    return tok


def _texts(path: str, key: str, field: str) -> List[str]:
    texts = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{key}: {path} line {n} is not JSON: {exc}") from None
                if not isinstance(item, dict) or not isinstance(item.get(field), str):
                    raise ConfigError(f"{key}: {path} line {n} has no text field {field!r}")
                texts.append(item[field])
            else:
                texts.append(line.rstrip("\n"))
    if not texts:
        raise ConfigError(f"{key}: {path} holds no examples")
    return texts


def _dataset(path: str, key: str, tok: Any, field: str, max_length: int, keep_all: bool = False
             ) -> List[Dict[str, List[int]]]:
    """The tokenised examples; those shorter than 2 tokens (nothing to predict) are dropped unless `keep_all` (a
    teacher cache numbers the examples of the file)."""
    enc = tok(_texts(path, key, field), truncation=True, max_length=max_length)
    return [{"input_ids": ids, "attention_mask": mask} for ids, mask in zip(enc["input_ids"], enc["attention_mask"])
            if keep_all or len(ids) >= 2]


def _cached(path: str, train: List[Dict[str, List[int]]], tok: Any):
    """The training set joined to its cached teacher outputs, and the collator of such batches."""
    import torch

    from tgtfast.cache import CacheError, CachedTeacherDataset, TeacherCache, TeacherCollator

    try:
        cache = TeacherCache(path)
        data = CachedTeacherDataset(train, cache)
    except (CacheError, ValueError) as exc:
        raise ConfigError(f"teacher_cache: {exc}") from None
    keep = [i for i, ex in enumerate(train) if len(ex["input_ids"]) >= 2]
    collator = TeacherCollator(cache, pad_token_id=tok.pad_token_id, shift_labels=False)
    return torch.utils.data.Subset(data, keep), collator


def _run(args: argparse.Namespace) -> Dict[str, Any]:
    import torch
    from transformers import DataCollatorForLanguageModeling, TrainingArguments

    from tgtfast.integrations.transformers import DistillationTrainer

    cfg = load_config(args.config)
    base_dir = os.path.dirname(os.path.abspath(args.config))
    dtype = getattr(torch, cfg.get("dtype", "float32"))
    training = dict(cfg.get("training") or {})
    if args.out is not None:
        training["output_dir"] = args.out
    training.setdefault("report_to", "none")
    if not isinstance(training.get("output_dir"), str):
        raise ConfigError("training.output_dir (or --out) is required: where the student is saved")
    training["output_dir"] = os.path.abspath(training["output_dir"])
    try:
        targs = TrainingArguments(**training)
    except TypeError as exc:
        raise ConfigError(f"training: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"training: {exc}") from None

    data = cfg["data"]
    field = data.get("field", "text")
    max_length = data.get("max_length", 512)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ConfigError(f"data.max_length must be an int >= 2, got {max_length!r}")
    student_spec = cfg["student"]
    tok_path = cfg.get("tokenizer", student_spec if isinstance(student_spec, str) else None)
    if tok_path is None:
        raise ConfigError("tokenizer is required when the student is built from a config")
    tok = _tokenizer(_path(tok_path, "tokenizer", base_dir), "tokenizer")
    teacher_tok = None
    if cfg.get("teacher_tokenizer") is not None:
        teacher_tok = _tokenizer(_path(cfg["teacher_tokenizer"], "teacher_tokenizer", base_dir), "teacher_tokenizer")
    cache_dir = None if cfg.get("teacher_cache") is None else _path(cfg["teacher_cache"], "teacher_cache", base_dir)
    train = _dataset(_path(data["train"], "data.train", base_dir), "data.train", tok, field, max_length,
                     keep_all=cache_dir is not None)
    evals = None
    if data.get("eval") is not None:
        evals = _dataset(_path(data["eval"], "data.eval", base_dir), "data.eval", tok, field, max_length)

    collator = DataCollatorForLanguageModeling(tok, mlm=False)
    if cache_dir is not None:
        train, collator = _cached(cache_dir, train, tok)
        if evals is not None:
            raise ConfigError("data.eval needs a live teacher (the cache holds the training set's outputs only)")
    student = _model(student_spec, "student", base_dir, dtype)
    teacher = None if cache_dir is not None else _model(cfg["teacher"], "teacher", base_dir, dtype)
    if cfg.get("lora") is not None:
        try:
            import peft
        except ImportError:
            raise ConfigError("lora needs the peft package (pip install peft)") from None
        try:
            student = peft.get_peft_model(student, peft.LoraConfig(**cfg["lora"]))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"lora: {exc}") from None
    loss = dict(cfg.get("loss") or {})
    trainer = DistillationTrainer(
        student, targs, collator, train, evals, tok, teacher_model=teacher,
        teacher_tokenizer=teacher_tok, **loss)
    result = trainer.train(resume_from_checkpoint=args.resume or None)
    trainer.save_model()
    logs = [entry for entry in trainer.state.log_history if "kd_loss" in entry]
    summary = {"steps": trainer.state.global_step, "train_loss": result.training_loss,
               "output_dir": targs.output_dir}
    if logs:
        summary["kd_loss"] = logs[-1]["kd_loss"]
    if evals is not None:
        summary.update({k: v for k, v in trainer.evaluate().items() if k in ("eval_loss", "eval_kd_loss")})
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``tgtfast distill --config FILE.yaml [--out DIR] [--resume [CHECKPOINT]] [--help-config]``; returns the exit
    code (0, or 2 after a one-line error on stderr)."""
    ap = argparse.ArgumentParser(prog="tgtfast distill", description="Distil a Hugging Face causal LM into another "
                                 "with tgtfast's fused losses (models, data and TrainingArguments in a YAML config).",
                                 epilog="Run `tgtfast distill --help-config` for every config key.")
    ap.add_argument("--config", help="the YAML config file")
    ap.add_argument("--out", help="output directory (overrides training.output_dir)")
    ap.add_argument("--resume", nargs="?", const=True, default=None,
                    help="continue from the last checkpoint in the output directory (or from the one given)")
    ap.add_argument("--help-config", action="store_true", help="document every config key and exit")
    args = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.help_config:
        print(help_config())
        return 0
    try:
        if not args.config:
            raise ConfigError("--config FILE.yaml is required")
        summary = _run(args)
    except (ConfigError, ValueError, TypeError) as exc:
        print(f"tgtfast distill: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
