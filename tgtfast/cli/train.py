"""``tgtfast train --config FILE.yaml``: Teacher Guided Training of your own models on your own data.

The YAML file names the models and the data as ``module:function`` factories and holds the
:class:`tgtfast.TGTConfig` fields under ``train``::

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

A config runs code. Its factories (student, labeler, decoder, encoder, data, batch_fn) are Python modules that
are imported and called with your privileges, like the ``_target_`` entries of a Hydra config: run only
configs, and modules beside them, that you trust. A factory module is looked up among the installed modules
and then in the config file's directory (added at the end of ``sys.path``, never ahead of installed
packages); a module beside the config that has the name of an installed one (a ``matplotlib.py``, a
``json.py``) is refused rather than imported. ``--resume`` reads the checkpoint with
``torch.load(weights_only=True)``: tensors and plain containers only, no code.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import importlib.util
import json
import os
import sys
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from tgtfast import validation

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


def read_yaml(path: str) -> Any:
    """The YAML document in `path` (``yaml.safe_load``: plain data, no code); a ConfigError when it cannot be
    read or parsed."""
    import yaml

    try:
        with open(path) as fh:
            return yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None


def help_config() -> str:
    """The documentation of every config key."""
    from tgtfast.train import TGTConfig

    out = [
        "A config runs code: its module:function factories are imported and called with your privileges (as with",
        "Hydra's _target_), so run only configs and factory modules you trust. Factory modules are found among the",
        "installed modules, then in the config file's directory; one there named like an installed module is refused.",
        "Top-level keys:",
    ]
    out += [f"  {k}: {v}" for k, v in CONFIG_KEYS.items()]
    out.append("loss keys:")
    out += [f"  {k}: {v}" for k, v in LOSS_KEYS.items()]
    out.append("train keys (tgtfast.TGTConfig):")
    out += ["  " + line for line in TGTConfig.describe().splitlines()]
    return "\n".join(out)


def _local_module(base_dir: str, top: str) -> Optional[str]:
    """The file of the top-level module ``top`` in ``base_dir`` (a ``.py`` file or a package), or None."""
    for path in (os.path.join(base_dir, top + ".py"), os.path.join(base_dir, top, "__init__.py")):
        if os.path.isfile(path):
            return path
    return None


def _inside(path: Optional[str], directory: str) -> bool:
    if not path:
        return False
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


_CONFIG_DIRS: set = set()  # the config directories appended to sys.path (not "installed" locations)


def _installed_location(top: str, base_dir: str) -> Optional[str]:
    """Where the top-level module ``top`` is installed (a built-in, a frozen module, or a file on ``sys.path``
    outside the config directories), or None."""
    if top in sys.builtin_module_names or importlib.machinery.FrozenImporter.find_spec(top) is not None:
        return f"the built-in module {top}"
    skip = {os.path.realpath(d) for d in _CONFIG_DIRS | {base_dir}}
    paths = [p for p in sys.path if isinstance(p, str) and os.path.realpath(p or os.getcwd()) not in skip]
    try:
        spec = importlib.machinery.PathFinder.find_spec(top, paths)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.origin not in (None, "namespace"):
        return spec.origin
    return list(spec.submodule_search_locations or [top])[0]


def _load_local(top: str, path: str):
    """The module ``top`` from the file ``path`` of the config's directory (a stale module of that name, from
    another config's directory, is replaced)."""
    existing = sys.modules.get(top)
    if existing is not None and os.path.realpath(getattr(existing, "__file__", "") or "") == os.path.realpath(path):
        return existing
    for name in [m for m in sys.modules if m == top or m.startswith(top + ".")]:
        del sys.modules[name]
    package = os.path.basename(path) == "__init__.py"
    spec = importlib.util.spec_from_file_location(
        top, path, submodule_search_locations=[os.path.dirname(path)] if package else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[top] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(top, None)
        raise
    return module


def _import_factory_module(mod_name: str, key: str, base_dir: str):
    """Import ``mod_name`` for a factory: from the config's directory when the module is there, else from the
    installed modules. The directory goes at the end of ``sys.path`` (for the imports of the factory modules
    themselves), never ahead of installed packages, and a module there named like an installed module is
    refused rather than imported."""
    top = mod_name.split(".")[0]
    local = _local_module(base_dir, top)
    if local is not None:
        installed = _installed_location(top, base_dir)
        if installed is not None:
            raise ConfigError(
                f"{key}: the module {top!r} beside the config ({local}) has the name of an installed module "
                f"({installed}); rename it: a config's factories never shadow installed modules"
            )
    if base_dir not in sys.path:
        sys.path.append(base_dir)  # after the installed packages: the config's folder never shadows them
    _CONFIG_DIRS.add(base_dir)
    try:
        if local is not None:
            module = _load_local(top, local)
            if mod_name == top:
                return module
        return importlib.import_module(mod_name)
    except ImportError as exc:
        raise ConfigError(f"{key}: cannot import module {mod_name!r}: {exc}") from None
    except Exception as exc:  # the module's own code failed
        raise ConfigError(f"{key}: importing module {mod_name!r} raised {type(exc).__name__}: {exc}") from None


def _resolve(path: Any, key: str, base_dir: str) -> Callable:
    if not isinstance(path, str) or path.count(":") != 1 or not all(path.split(":")):
        raise ConfigError(f"{key} must be 'module:function', got {path!r}")
    mod_name, fn_name = path.split(":")
    module = _import_factory_module(mod_name, key, base_dir)
    fn = getattr(module, fn_name, None)
    if fn is None or not callable(fn):
        raise ConfigError(f"{key}: {mod_name!r} has no callable {fn_name!r}")
    return fn


def _build(spec: Any, key: str, base_dir: str) -> Any:
    """Call the factory named by ``spec`` ('module:function' or {factory:, args:}); whatever it raises becomes
    a ConfigError naming the key."""
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
    fn = _resolve(spec, key, base_dir)
    try:
        return fn(**args)
    except Exception as exc:
        raise ConfigError(f"{key}: calling {spec}(**{args}) raised {type(exc).__name__}: {exc}") from None


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
    try:
        return validation.real(f"loss.{key}", loss.get(key, default))
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


def _int(loss: Dict[str, Any], key: str, default: int) -> int:
    try:
        return validation.integer(f"loss.{key}", loss.get(key, default))
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


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
    """Read and check the YAML file's top level (unknown keys are an error).

    Reading runs no code (``yaml.safe_load``), but the config it returns names ``module:function`` factories
    that ``tgtfast train`` then imports and calls: a config runs code, like a Hydra config's ``_target_``
    entries. Run only configs and factory modules you trust."""
    cfg = read_yaml(path)
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


def _train_values(cfg: Dict[str, Any], args: argparse.Namespace) -> Dict[str, Any]:
    """The ``train`` mapping with the command line's overrides applied (before the fields are validated, so
    that ``--out`` satisfies a ``checkpoint_every`` without ``out_dir``)."""
    values = dict(cfg.get("train") or {})
    if args.out is not None:
        values["out_dir"] = args.out
    if args.resume:
        values["resume"] = True
    if args.quick:
        steps = values.get("max_steps")
        if steps is None:
            values["max_steps"] = 5
        elif isinstance(steps, int) and not isinstance(steps, bool):
            values["max_steps"] = min(steps, 5)  # anything else: validation names the field
        values["checkpoint_every"] = 0
    out_dir = values.get("out_dir")
    if isinstance(out_dir, str) and not os.path.isabs(out_dir):
        values["out_dir"] = os.path.join(os.getcwd(), out_dir)
    return values


def _run(args: argparse.Namespace):
    import tgtfast

    cfg = load_config(args.config)
    base_dir = os.path.dirname(os.path.abspath(args.config))
    config = tgtfast.TGTConfig.from_dict(_train_values(cfg, args))  # type and range errors name the field

    student = _build(cfg["student"], "student", base_dir)
    labeler = _build(cfg["labeler"], "labeler", base_dir)
    decoder = _build(cfg["decoder"], "decoder", base_dir) if cfg.get("decoder") is not None else None
    encoder = _build(cfg["encoder"], "encoder", base_dir) if cfg.get("encoder") is not None else None
    train, val = _split_data(_build(cfg["data"], "data", base_dir))
    batch_fn = _resolve(cfg["batch_fn"], "batch_fn", base_dir) if cfg.get("batch_fn") is not None else None
    loss = _make_loss(cfg.get("loss"), labeler, val, batch_fn, base_dir)
    trainer = tgtfast.TGTTrainer(student, labeler, decoder=decoder, encoder=encoder, loss=loss, config=config, batch_fn=batch_fn)
    return trainer.fit(train, val), config.out_dir


if __name__ == "__main__":
    sys.exit(main())
