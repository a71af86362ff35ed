"""``tgtfast train --config FILE.yaml``: Teacher Guided Training of your own models on your own data.

The YAML file names the models and the data as ``module:function`` factories (imported from the config file's
directory first, then from ``sys.path``) and holds the :class:`tgtfast.TGTConfig` fields under ``train``::

    # tgtfast train --config run.yaml
    student: my_models:make_student          # module:function, or {factory: module:function, args: {...}}
    labeler: my_models:make_labeler          # the frozen teacher labeler
    decoder: my_models:make_decoder          # the frozen teacher generator (not needed with exploration: none)
    encoder: my_models:make_encoder
    data: my_data:make_data                  # returns train, (train, val) or {train: ..., val: ...}
    batch_fn: my_data:to_inputs_and_labels   # optional; used as is: batch -> (inputs, labels)
    loss:                                    # optional, default {name: kl}
      name: ptloss                           # kl | ptloss | label_smoothed | focal
      temperature: 2.0
      coeffs: [0.5, -0.2]                    # ptloss: a list, a `tgtfast coeffs` JSON file, or "search"
    train:                                   # TGTConfig fields (tgtfast train --help-config)
      exploration: random
      sigma: 0.5
      epochs: 3
      out_dir: runs/first

Unknown keys anywhere are an error, as are values of the wrong type; everything is checked before training
starts, and a failing run overwrites nothing already saved.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from numbers import Integral, Real
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

__all__ = ["main", "train_main", "ConfigError", "load_config", "CONFIG_KEYS", "LOSS_KEYS", "help_config"]

# Top-level keys of the YAML file and what they mean.
CONFIG_KEYS = {
    "student": "factory of the student nn.Module (required): 'module:function' or {factory: ..., args: {...}}",
    "labeler": "factory of the frozen teacher labeler (required): inputs -> logits [N, K]",
    "decoder": "factory of the frozen teacher decoder: latent [N, d] -> inputs (needed unless exploration: none)",
    "encoder": "factory of the frozen teacher encoder: inputs -> latent [N, d] (needed unless exploration: none)",
    "data": "factory of the data (required): returns train, (train, val) or {train: ..., val: ...}; each a "
            "map-style Dataset, a DataLoader over one, or a tuple of tensors (x, y)",
    "batch_fn": "optional function 'module:function' used as is: collated batch -> (inputs, labels)",
    "loss": "the distillation loss l_d (optional, default {name: kl}); keys below",
    "train": "the TGTConfig fields (keys below); a relative out_dir is taken from the working directory",
}
LOSS_KEYS = {
    "name": "kl (KDLoss), ptloss (PTLoss), label_smoothed (LabelSmoothedKDLoss) or focal (FocalKDLoss)",
    "temperature": "softmax temperature of student and teacher (> 0), default 1.0",
    "coeffs": "ptloss only: a list [M] or [M][K], the path of a `tgtfast coeffs` JSON file (relative to the "
              "config file), or 'search' (the Proxy Teacher on the validation set's teacher predictions and labels)",
    "order": "ptloss with coeffs: search: polynomial order M (default 5)",
    "num_candidates": "ptloss with coeffs: search: random coefficient sets tried (default 100)",
    "label_smoothing": "label_smoothed (default 0.1) and ptloss (default 0): smoothing of the teacher",
    "gamma": "focal only: focusing exponent (default 2.0)",
}
_FACTORY_KEYS = ("factory", "args")


class ConfigError(ValueError):
    """A problem with the YAML config (the message names the key)."""


def help_config() -> str:
    """The documentation of every config key."""
    from tgtfast.train import TGTConfig

    out = ["Top-level keys:"]
    out += [f"  {k}: {v}" for k, v in CONFIG_KEYS.items()]
    out.append("loss keys:")
    out += [f"  {k}: {v}" for k, v in LOSS_KEYS.items()]
    out.append("train keys (tgtfast.TGTConfig):")
    out += ["  " + line for line in TGTConfig.describe().splitlines()]
    return "\n".join(out)


def _resolve(path: Any, key: str) -> Callable:
    if not isinstance(path, str) or path.count(":") != 1:
        raise ConfigError(f"{key} must be 'module:function', got {path!r}")
    mod_name, fn_name = path.split(":")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ConfigError(f"{key}: cannot import module {mod_name!r}: {exc}") from None
    fn = getattr(module, fn_name, None)
    if fn is None or not callable(fn):
        raise ConfigError(f"{key}: {mod_name!r} has no callable {fn_name!r}")
    return fn


def _build(spec: Any, key: str) -> Any:
    """Call the factory named by ``spec`` ('module:function' or {factory:, args:})."""
    args: Dict[str, Any] = {}
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - set(_FACTORY_KEYS))
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} under {key}; known: {list(_FACTORY_KEYS)}")
        if "factory" not in spec:
            raise ConfigError(f"{key} needs a 'factory: module:function' entry")
        args = spec.get("args") or {}
        if not isinstance(args, dict):
            raise ConfigError(f"{key}.args must be a mapping of keyword arguments, got {type(args).__name__}")
        spec = spec["factory"]
    fn = _resolve(spec, key)
    try:
        return fn(**args)
    except TypeError as exc:
        raise ConfigError(f"{key}: calling {spec}(**{args}) failed: {exc}") from None


def _split_data(obj: Any) -> Tuple[Any, Any]:
    if isinstance(obj, dict):
        unknown = sorted(set(obj) - {"train", "val"})
        if unknown or "train" not in obj:
            raise ConfigError(f"the data factory returned a mapping with keys {sorted(obj)}; expected train (and val)")
        return obj["train"], obj.get("val")
    if isinstance(obj, tuple) and len(obj) == 2 and not all(_is_tensor(o) for o in obj):
        return obj[0], obj[1]
    return obj, None


def _is_tensor(x: Any) -> bool:
    import torch

    return isinstance(x, torch.Tensor)


def _number(loss: Dict[str, Any], key: str, default: float) -> float:
    v = loss.get(key, default)
    if isinstance(v, bool) or not isinstance(v, Real):
        raise ConfigError(f"loss.{key} must be a number, got {type(v).__name__} {v!r}")
    return float(v)


def _int(loss: Dict[str, Any], key: str, default: int) -> int:
    v = loss.get(key, default)
    if isinstance(v, bool) or not isinstance(v, Integral):
        raise ConfigError(f"loss.{key} must be an int, got {type(v).__name__} {v!r}")
    return int(v)


def _make_loss(spec: Any, labeler: Any, val: Any, batch_fn: Optional[Callable], base_dir: str):
    import tgtfast

    spec = {"name": "kl"} if spec is None else spec
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict):
        raise ConfigError(f"loss must be a mapping (or a loss name), got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(LOSS_KEYS))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} under loss; known: {list(LOSS_KEYS)}")
    name = spec.get("name", "kl")
    allowed = {"kl": {"name", "temperature"}, "ptloss": {"name", "temperature", "coeffs", "order", "num_candidates",
                                                          "label_smoothing"},
               "label_smoothed": {"name", "temperature", "label_smoothing"}, "focal": {"name", "temperature", "gamma"}}
    if name not in allowed:
        raise ConfigError(f"loss.name must be one of {sorted(allowed)}, got {name!r}")
    extra = sorted(set(spec) - allowed[name])
    if extra:
        raise ConfigError(f"loss key(s) {extra} do not apply to loss.name {name!r}")
    T = _number(spec, "temperature", 1.0)
    try:
        if name == "kl":
            return tgtfast.KDLoss(temperature=T)
        if name == "label_smoothed":
            return tgtfast.LabelSmoothedKDLoss(_number(spec, "label_smoothing", 0.1), temperature=T)
        if name == "focal":
            return tgtfast.FocalKDLoss(_number(spec, "gamma", 2.0), temperature=T)
        coeffs = spec.get("coeffs")
        if ("order" in spec or "num_candidates" in spec) and coeffs != "search":
            raise ConfigError("loss.order and loss.num_candidates apply only with coeffs: search")
        if coeffs == "search":
            coeffs = _search_coeffs(spec, labeler, val, batch_fn, T)
        elif isinstance(coeffs, str):
            coeffs = coeffs if os.path.isabs(coeffs) else os.path.join(base_dir, coeffs)
            if not os.path.exists(coeffs):
                raise ConfigError(f"loss.coeffs: no such file {coeffs!r}")
        elif coeffs is not None and not isinstance(coeffs, list):
            raise ConfigError(f"loss.coeffs must be a list, a JSON file path or 'search', got {type(coeffs).__name__}")
        return tgtfast.PTLoss(coeffs, temperature=T, label_smoothing=_number(spec, "label_smoothing", 0.0))
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"loss: {exc}") from None


def _search_coeffs(spec: Dict[str, Any], labeler: Any, val: Any, batch_fn: Optional[Callable], T: float):
    import torch

    import tgtfast
    from tgtfast.train.data import as_dataset, default_batch_fn

    if val is None:
        raise ConfigError("loss.coeffs: search needs a validation set (the data factory returned none)")
    dataset, collate = as_dataset(val, "val")
    fn = batch_fn or default_batch_fn
    logits, labels = [], []
    if hasattr(labeler, "eval"):
        labeler.eval()
    with torch.no_grad():
        for i in range(0, len(dataset), 256):
            x, y = fn(collate([dataset[j] for j in range(i, min(i + 256, len(dataset)))]))
            if y is None:
                raise ConfigError("loss.coeffs: search needs labels in the validation set")
            keep = y != -100
            logits.append(labeler(x)[keep].float())
            labels.append(y[keep])
    res = tgtfast.search_coefficients(torch.cat(logits), torch.cat(labels), order=_int(spec, "order", 5),
                                      num_candidates=_int(spec, "num_candidates", 100), temperature=T,
                                      teacher_is_logits=True, seed=0)
    return res.coeffs


def load_config(path: str) -> Dict[str, Any]:
    """Read and check the YAML file's top level (unknown keys are an error)."""
    import yaml

    try:
        with open(path) as fh:
            cfg = yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path} must hold a mapping of the keys {list(CONFIG_KEYS)}")
    unknown = sorted(set(cfg) - set(CONFIG_KEYS))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {path}; known: {list(CONFIG_KEYS)}")
    for key in ("student", "labeler", "data"):
        if key not in cfg:
            raise ConfigError(f"{path} needs a '{key}' entry ({CONFIG_KEYS[key]})")
    if cfg.get("train") is not None and not isinstance(cfg["train"], dict):
        raise ConfigError(f"train must be a mapping of TGTConfig fields, got {type(cfg['train']).__name__}")
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``tgtfast train --config FILE.yaml [--quick] [--out DIR] [--resume] [--help-config]``; returns the exit
    code (0, or 2 after a one-line error on stderr)."""
    ap = argparse.ArgumentParser(
        prog="tgtfast train", description="Teacher Guided Training of a student from a frozen teacher "
        "(models and data named as module:function factories in a YAML config).",
        epilog="Run `tgtfast train --help-config` for every config key.")
    ap.add_argument("--config", help="the YAML config file")
    ap.add_argument("--quick", action="store_true",
                    help="a short check of the config: at most 5 optimiser steps, no intermediate checkpoints")
    ap.add_argument("--out", help="output directory (overrides train.out_dir)")
    ap.add_argument("--resume", action="store_true", help="continue the run saved in the output directory")
    ap.add_argument("--help-config", action="store_true", help="document every config key and exit")
    args = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.help_config:
        print(help_config())
        return 0
    if not args.config:
        ap.print_usage(sys.stderr)
        print("tgtfast train: error: --config FILE.yaml is required", file=sys.stderr)
        return 2
    try:
        history, out_dir = _run(args)
    except (ConfigError, ValueError, TypeError) as exc:
        print(f"tgtfast train: error: {exc}", file=sys.stderr)
        return 2
    summary = {"steps": history.steps, **{k: v for k, v in history.final.items() if k != "step"}}
    if out_dir is not None:
        summary["out_dir"] = out_dir
    print(json.dumps(summary))
    return 0


train_main = main  # the name of the entry point before tgtfast.cli.train held it


def _run(args: argparse.Namespace):
    import tgtfast

    cfg = load_config(args.config)
    base_dir = os.path.dirname(os.path.abspath(args.config))
    if base_dir not in sys.path:
        sys.path.insert(0, base_dir)
    config = tgtfast.TGTConfig.from_dict(dict(cfg.get("train") or {}))  # type and range errors name the field
    changes: Dict[str, Any] = {}
    if args.out is not None:
        changes["out_dir"] = args.out
    if args.resume:
        changes["resume"] = True
    if args.quick:
        changes["max_steps"] = 5 if config.max_steps is None else min(config.max_steps, 5)
        changes["checkpoint_every"] = 0
    out_dir = changes.get("out_dir", config.out_dir)
    if out_dir is not None and not os.path.isabs(out_dir):
        changes["out_dir"] = os.path.join(os.getcwd(), out_dir)
    config = config.replace(**changes)

    student = _build(cfg["student"], "student")
    labeler = _build(cfg["labeler"], "labeler")
    decoder = _build(cfg["decoder"], "decoder") if cfg.get("decoder") is not None else None
    encoder = _build(cfg["encoder"], "encoder") if cfg.get("encoder") is not None else None
    train, val = _split_data(_build(cfg["data"], "data"))
    batch_fn = _resolve(cfg["batch_fn"], "batch_fn") if cfg.get("batch_fn") is not None else None
    loss = _make_loss(cfg.get("loss"), labeler, val, batch_fn, base_dir)
    trainer = tgtfast.TGTTrainer(student, labeler, decoder, encoder, loss=loss, config=config, batch_fn=batch_fn)
    return trainer.fit(train, val), config.out_dir
