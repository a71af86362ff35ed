"""Teacher Guided Training (TGT paper Sec. 3.2; DESIGN.md section 3): :class:`TGTConfig` and :class:`TGTTrainer`.

The teacher is a frozen generator (``encoder: X -> R^d``, ``decoder: R^d -> X``) and a frozen labeler
``h: X -> R^K``. For a labelled batch ``(x, y)`` the student ``f`` minimises

    w_ce * CE(f(x), y) + w_kd * l_d(f(x), h(x)) + w_tgt * l_d(f(x'), h(x'))

where ``l_d`` is any distillation loss of the package (default :class:`tgtfast.KDLoss`) and the new samples
``x'`` come from the teacher's latent space:

* ``exploration="none"``: no new samples (plain distillation, plus the CE term);
* ``"random"``: ``x' = Dec(Enc(x) + sigma * noise)``;
* ``"gradient"``: start at ``z = Enc(x) + sigma * noise`` and take ``explore_steps`` ascent steps
  ``z <- z + explore_step_size * grad_z l_d(f(Dec(z)), h(Dec(z)))`` (the gradient optionally normalised per row,
  ``z`` optionally projected back into a ball of radius ``explore_radius`` around ``Enc(x)``), then
  ``x' = Dec(z)``.

``Enc(x)`` and ``h(x)`` of the training set are computed once and cached (``cache_teacher=True``). The
perturb -> decode -> label step goes through :func:`tgtfast.perturb_decode_label` (fused kernels when the
decoder and labeler are MLPs).

Noise streams. Every micro-batch of every optimiser step has its own Philox key
``seed = noise_seed(config.seed, step, micro_batch, round)`` (``round`` 0 is the initial perturbation); the
``samples_per_example`` codes of the example at position ``p`` of the *global* micro-batch are rows
``p * S .. p * S + S - 1`` of that stream, so a rank whose share of the global micro-batch starts at position
``p0`` uses ``offset = p0 * S * d``. The noise an example gets therefore depends only on (seed, step,
micro-batch, its position), not on the number of processes, and a resumed run draws exactly the noise the
interrupted one would have drawn.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import tempfile
import time
import typing
import warnings
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as TF
from torch import nn

__all__ = ["TGTConfig", "TGTTrainer", "TGTHistory", "noise_seed"]

_EXPLORATIONS = ("none", "random", "gradient")
_OPTIMIZERS = ("adamw", "adam", "sgd")
_SCHEDULES = ("constant", "cosine", "linear")
_MASK63 = (1 << 63) - 1
_MASK64 = (1 << 64) - 1


# ---------------------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------------------

# Fields that change how a run is observed or stored, not the weights it produces: left out of the fingerprint
# that a resumed run must match.
_NOT_FINGERPRINTED = frozenset(
    {"out_dir", "checkpoint_every", "resume", "overwrite", "log_every", "eval_every", "progress", "plot",
     "device", "distributed_backend", "num_workers"}
)


_FIELD_DOCS = {
    "w_ce": "weight of CE(f(x), y) on the labelled examples (>= 0)",
    "w_kd": "weight of the distillation term l_d(f(x), h(x)) on the training inputs (>= 0)",
    "w_tgt": "weight of the distillation term l_d(f(x'), h(x')) on the generated samples (>= 0)",
    "exploration": "how new samples are made: 'none' (plain distillation), 'random' (latent noise) or 'gradient' "
                   "(latent gradient ascent on the student-teacher divergence)",
    "sigma": "standard deviation of the latent noise (>= 0); in 'gradient' mode the noise of the starting point",
    "samples_per_example": "new samples per training example and step (>= 1)",
    "explore_steps": "gradient-ascent steps in 'gradient' mode (>= 1)",
    "explore_step_size": "ascent step size in latent space (> 0)",
    "explore_normalize": "divide each row's latent gradient by its L2 norm, so that a step moves each code by "
                         "exactly explore_step_size; false: plain gradient ascent on the summed divergence",
    "explore_radius": "if set, keep every explored code within this L2 distance of Enc(x) (projection)",
    "batch_size": "examples per micro-batch over all processes (the global micro-batch, split between ranks)",
    "grad_accum_steps": "micro-batches per optimiser step; the loss is normalised by the total number of examples "
                        "in them (labelled examples for the CE term)",
    "epochs": "passes over the training set (ignored when max_steps is set)",
    "max_steps": "optimiser steps to run; overrides epochs",
    "drop_last": "skip a last micro-batch smaller than batch_size (one smaller than the number of processes is "
                 "always skipped)",
    "optimizer": "'adamw', 'adam' or 'sgd'",
    "lr": "learning rate (> 0), the peak of the schedule",
    "weight_decay": "weight decay (>= 0), as in torch.optim",
    "momentum": "SGD momentum (>= 0); unused by Adam/AdamW",
    "lr_schedule": "'constant', 'cosine' (to 0) or 'linear' (to 0) over the run, after the warm-up",
    "warmup_steps": "steps of linear learning-rate warm-up (>= 0)",
    "grad_clip": "clip the gradient's global L2 norm to this value (> 0); null: no clipping",
    "seed": "seeds the data order, the noise streams and torch's global generator (dropout); >= 0",
    "device": "'cpu', 'cuda', 'cuda:1', ...; null: CUDA when available. Under torchrun on CUDA each process "
              "takes cuda:LOCAL_RANK",
    "bf16": "run the student's forward under torch.autocast(dtype=torch.bfloat16); losses stay float32",
    "cache_teacher": "compute Enc(x) and h(x) of the training set once before training (false: every batch)",
    "out_dir": "directory for metrics.jsonl, curves.png, history.json and checkpoint.pt (rank 0 writes); "
               "null: write nothing",
    "checkpoint_every": "also checkpoint every N optimiser steps (0: only at the end); needs out_dir",
    "resume": "continue from out_dir/checkpoint.pt when it exists; its config must match",
    "overwrite": "let a fresh run (resume false) replace an existing checkpoint in out_dir",
    "log_every": "record a metrics line every N steps and at the last step (>= 1)",
    "num_workers": "DataLoader worker processes that load and collate the batches (0: the main process does); "
                   "tensor data is always gathered in the main process",
    "eval_every": "evaluate on the validation set every N steps (0: only at the end)",
    "progress": "show a tqdm progress bar; null: when stderr is a terminal",
    "plot": "write curves.png at the end (needs matplotlib)",
    "distributed_backend": "process-group backend under torchrun: 'gloo', 'nccl' or 'mpi'; null: NCCL on CUDA, "
                           "gloo on CPU",
}


@dataclass
class TGTConfig:
    """Settings of a :class:`TGTTrainer` run; every field is validated when the config is built (a wrong type
    is a ``TypeError``, a value out of range a ``ValueError``, both naming the field). The fields (also printed
    by ``tgtfast train --help-config``):
    """

    w_ce: float = 1.0
    w_kd: float = 1.0
    w_tgt: float = 1.0
    exploration: str = "random"
    sigma: float = 1.0
    samples_per_example: int = 1
    explore_steps: int = 3
    explore_step_size: float = 0.5
    explore_normalize: bool = True
    explore_radius: Optional[float] = None
    batch_size: int = 64
    grad_accum_steps: int = 1
    epochs: int = 1
    max_steps: Optional[int] = None
    drop_last: bool = False
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    grad_clip: Optional[float] = None
    seed: int = 0
    device: Optional[str] = None
    bf16: bool = False
    cache_teacher: bool = True
    out_dir: Optional[str] = None
    checkpoint_every: int = 0
    resume: bool = False
    overwrite: bool = False
    log_every: int = 10
    num_workers: int = 0
    eval_every: int = 0
    progress: Optional[bool] = None
    plot: bool = True
    distributed_backend: Optional[str] = None

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _check_type(f.name, getattr(self, f.name), hints[f.name]))
        for name in ("w_ce", "w_kd", "w_tgt", "sigma", "weight_decay", "momentum"):
            _check_range(name, getattr(self, name), low=0.0)
        for name in ("explore_step_size", "lr"):
            _check_range(name, getattr(self, name), low=0.0, strict=True)
        for name in ("explore_radius", "grad_clip"):
            if getattr(self, name) is not None:
                _check_range(name, getattr(self, name), low=0.0, strict=True)
        for name in ("samples_per_example", "explore_steps", "batch_size", "grad_accum_steps", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"config.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "checkpoint_every", "eval_every", "seed", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"config.{name} must be >= 0, got {getattr(self, name)}")
        if self.log_every < 1:
            raise ValueError(f"config.log_every must be >= 1, got {self.log_every}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"config.max_steps must be >= 1 or None, got {self.max_steps}")
        _check_choice("exploration", self.exploration, _EXPLORATIONS)
        _check_choice("optimizer", self.optimizer, _OPTIMIZERS)
        _check_choice("lr_schedule", self.lr_schedule, _SCHEDULES)
        if self.distributed_backend is not None:
            _check_choice("distributed_backend", self.distributed_backend, ("gloo", "nccl", "mpi"))
        if self.device is not None:
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ValueError(f"config.device must name a torch device, got {self.device!r}") from None
        if (self.checkpoint_every or self.resume) and self.out_dir is None:
            raise ValueError("config.checkpoint_every and config.resume need config.out_dir")

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TGTConfig":
        """Build a config from a mapping; unknown keys are an error (naming them and the known ones)."""
        if not isinstance(values, dict):
            raise TypeError(f"config must be a mapping, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "TGTConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def describe(cls) -> str:
        """Every field with its type, default and meaning (the text ``tgtfast train --help-config`` prints)."""
        hints = typing.get_type_hints(cls)
        return "\n".join(
            f"{f.name} ({_type_name(hints[f.name])}, default {_yaml_value(f.default)}): {_FIELD_DOCS[f.name]}"
            for f in dataclasses.fields(cls)
        )


def _yaml_value(v: Any) -> str:
    return "null" if v is None else ("true" if v is True else "false" if v is False else repr(v))


def _type_name(t: Any) -> str:
    args = typing.get_args(t)
    if args and type(None) in args:
        inner = [a for a in args if a is not type(None)][0]
        return f"{inner.__name__} or null"
    return t.__name__


def _check_type(name: str, value: Any, hint: Any) -> Any:
    args = typing.get_args(hint)
    optional = bool(args) and type(None) in args
    base = [a for a in args if a is not type(None)][0] if optional else hint
    if value is None:
        if optional:
            return None
        raise TypeError(f"config.{name} must be {base.__name__}, got None")
    if base is bool:
        if not isinstance(value, bool):
            raise TypeError(f"config.{name} must be a bool, got {type(value).__name__} {value!r}")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, Integral):
            raise TypeError(f"config.{name} must be an int, got {type(value).__name__} {value!r}")
        return int(value)
    if base is float:
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"config.{name} must be a number, got {type(value).__name__} {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"config.{name} must be finite, got {value}")
        return value
    if base is str:
        if not isinstance(value, str):
            raise TypeError(f"config.{name} must be a string, got {type(value).__name__} {value!r}")
        return value
    return value  # pragma: no cover - every field is one of the above


def _check_range(name: str, value: float, *, low: float, strict: bool = False) -> None:
    if value < low or (strict and value == low):
        raise ValueError(f"config.{name} must be {'>' if strict else '>='} {low}, got {value}")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"config.{name} must be one of {tuple(choices)}, got {value!r}")


TGTConfig.__doc__ = (TGTConfig.__doc__ or "") + "\n" + "\n".join(
    "    " + line for line in TGTConfig.describe().splitlines()
) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# noise streams
# ---------------------------------------------------------------------------------------------------------------


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def noise_seed(seed: int, step: int, micro_batch: int = 0, round: int = 0) -> int:
    """The Philox key of the latent noise of optimiser step ``step`` (0-based), micro-batch ``micro_batch`` and
    exploration round ``round`` of a run seeded with ``seed``: a splitmix64 hash of the four, in ``[0, 2**63)``.

    It does not depend on the process: ranks draw disjoint parts of the same stream through the offset (see
    the module docstring)."""
    h = _splitmix64(int(seed) & _MASK64)
    for v in (step, micro_batch, round):
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h & _MASK63


def _eager_perturb_decode_label(z: torch.Tensor, decoder: Callable, labeler: Callable, *, sigma: float, seed: int,
                                offset: int = 0, temperature: float = 1.0, backend: Optional[str] = None):
    """Eager ``(decoder(z + sigma * noise), softmax(labeler(.) / temperature))`` with the package's noise."""
    from tgtfast import reference

    zz = z
    if sigma != 0.0:
        zz = z + sigma * reference.latent_noise(tuple(z.shape), seed, offset, device=z.device, dtype=z.dtype)
    x = decoder(zz)
    return x, torch.softmax(labeler(x).float() / temperature, dim=-1)


def _perturb_decode_label() -> Callable:
    import tgtfast

    return getattr(tgtfast, "perturb_decode_label", None) or _eager_perturb_decode_label


def _mix(*values: int) -> int:
    h = 0
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h & _MASK63


# ---------------------------------------------------------------------------------------------------------------
# history
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TGTHistory:
    """What :meth:`TGTTrainer.fit` returns: one record per logged step (``train``) and per evaluation (``val``).

    Train records hold ``step``, ``epoch``, ``lr``, ``loss`` and its terms ``ce``, ``kd``, ``tgt`` (each the
    unweighted normalised term; ``kd`` and ``tgt`` are 0, not computed, when their weight is 0), ``acc`` (on the
    labelled examples of the step), ``examples_per_s`` and ``samples_per_s`` (examples plus generated samples).
    Val records hold ``step``, ``val_acc``, ``val_ce`` and ``val_kd``."""

    train: List[Dict[str, float]] = field(default_factory=list)
    val: List[Dict[str, float]] = field(default_factory=list)
    steps: int = 0

    def column(self, name: str) -> List[float]:
        """The values of one metric over the records that have it (train records first, then val)."""
        return [r[name] for r in self.train + self.val if name in r]

    @property
    def final(self) -> Dict[str, float]:
        """The last train record merged with the last val record."""
        out: Dict[str, float] = {}
        if self.train:
            out.update(self.train[-1])
        if self.val:
            out.update(self.val[-1])
        return out

    def to_dict(self) -> Dict[str, Any]:
        return {"train": self.train, "val": self.val, "steps": self.steps}


# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------


class _TensorPairs(torch.utils.data.Dataset):
    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        n = tensors[0].shape[0]
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"train/val tuple element {i} must be a tensor, got {type(t).__name__}")
            if t.shape[0] != n:
                raise ValueError(f"train/val tensors disagree on the number of examples: {n} vs {t.shape[0]}")
        self.tensors = tuple(tensors)

    def __len__(self) -> int:
        return self.tensors[0].shape[0]

    def __getitem__(self, i: int):
        return tuple(t[i] for t in self.tensors)


def _as_dataset(data: Any, name: str) -> Tuple[torch.utils.data.Dataset, Callable]:
    """A map-style dataset and the collate function to batch it."""
    from torch.utils.data import DataLoader, Dataset
    from torch.utils.data._utils.collate import default_collate

    if isinstance(data, DataLoader):
        return _as_dataset(data.dataset, name)[0], data.collate_fn or default_collate
    if isinstance(data, torch.Tensor):
        return _TensorPairs([data]), default_collate
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        return _TensorPairs(list(data)), default_collate
    if isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        if isinstance(data, torch.utils.data.IterableDataset):
            raise TypeError(f"{name} must be a map-style dataset (indexable, with a length), not an IterableDataset")
        return data, default_collate
    raise TypeError(
        f"{name} must be a map-style Dataset, a DataLoader over one, or a tuple of tensors (x, y), "
        f"got {type(data).__name__}"
    )


def _default_batch_fn(batch: Any) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and 1 <= len(batch) <= 2:
        return batch[0], (batch[1] if len(batch) == 2 else None)
    raise TypeError(
        f"a batch is a {type(batch).__name__}; the default batch_fn takes (x, y) or (x,) batches: pass "
        f"batch_fn=lambda batch: (inputs, labels) to TGTTrainer"
    )


# ---------------------------------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------------------------------


class _StepSampler:
    """The batch sampler of the DataLoader used with ``num_workers > 0``: this rank's micro-batches of the steps
    ``start .. total - 1``, in the order the training loop consumes them."""

    def __init__(self, trainer: "TGTTrainer", start: int, total: int, n: int, micro: int, spe: int) -> None:
        self.trainer, self.start, self.total, self.n, self.micro, self.spe = trainer, start, total, n, micro, spe

    def __iter__(self):
        for step in range(self.start, self.total):
            for _, idx, _, _ in self.trainer._step_batches(step, self.n, self.micro, self.spe)[1]:
                yield idx


class TGTTrainer:
    """Train ``student`` by Teacher Guided Training (see the module docstring for the objective).

    Args:
        student: the model trained; maps a batch of inputs ``x`` to logits ``[N, K]``.
        labeler: the frozen teacher labeler ``h``: inputs to logits ``[N, K]``.
        decoder: the frozen teacher decoder ``Dec: [N, d] -> inputs`` (``None`` only with ``exploration="none"``).
        encoder: the frozen teacher encoder ``Enc: inputs -> [N, d]`` (needed for exploration).
        loss: the distillation loss ``l_d(student_logits, teacher_logits)``: any loss of the package
            (:class:`tgtfast.KDLoss`, :class:`tgtfast.PTLoss` e.g. with coefficients from
            :func:`tgtfast.search_coefficients`, ...) or a callable returning the mean over rows. Its
            ``temperature`` attribute (if any) is the temperature of the teacher's soft labels. Default
            ``tgtfast.KDLoss()``.
        config: a :class:`TGTConfig`.
        batch_fn: maps a collated batch to ``(inputs, labels)``; labels may be ``None`` (unlabelled) and
            label ``-100`` marks an unlabelled example. Default: batches ``(x, y)`` or ``(x,)``.
        optimizer: optional ``params -> torch.optim.Optimizer`` factory replacing ``config.optimizer``.

    The teacher modules are put in eval mode and their parameters stop requiring gradients. During gradient
    exploration the student runs in eval mode (no dropout, no batch-norm statistics updates).
    """

    def __init__(
        self,
        student: nn.Module,
        labeler: Callable[[torch.Tensor], torch.Tensor],
        decoder: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        encoder: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        *,
        loss: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
        config: Optional[TGTConfig] = None,
        batch_fn: Optional[Callable[[Any], Tuple[torch.Tensor, Optional[torch.Tensor]]]] = None,
        optimizer: Optional[Callable[[Any], torch.optim.Optimizer]] = None,
    ) -> None:
        import tgtfast

        config = TGTConfig() if config is None else config
        if not isinstance(config, TGTConfig):
            raise TypeError(f"config must be a tgtfast.TGTConfig, got {type(config).__name__}")
        if not isinstance(student, nn.Module):
            raise TypeError(f"student must be a torch.nn.Module, got {type(student).__name__}")
        for name, mod in (("labeler", labeler), ("decoder", decoder), ("encoder", encoder)):
            if mod is not None and not callable(mod):
                raise TypeError(f"{name} must be a module or callable, got {type(mod).__name__}")
        if labeler is None:
            raise TypeError("labeler is required (the teacher that labels inputs)")
        if config.exploration != "none":
            if decoder is None:
                raise ValueError(f"exploration={config.exploration!r} needs a decoder (or use exploration='none')")
            if encoder is None:
                raise ValueError(
                    f"exploration={config.exploration!r} needs an encoder to map the training inputs to latent "
                    "codes (or use exploration='none')"
                )
        if loss is not None and not callable(loss):
            raise TypeError(f"loss must be callable (student_logits, teacher_logits) -> loss, got {type(loss).__name__}")
        if batch_fn is not None and not callable(batch_fn):
            raise TypeError(f"batch_fn must be callable, got {type(batch_fn).__name__}")
        if optimizer is not None and not callable(optimizer):
            raise TypeError(f"optimizer must be a callable params -> Optimizer, got {type(optimizer).__name__}")
        self.student = student
        self.labeler = labeler
        self.decoder = decoder
        self.encoder = encoder
        self.loss = tgtfast.KDLoss() if loss is None else loss
        self.config = config
        self.batch_fn = batch_fn or _default_batch_fn
        self._optimizer_factory = optimizer
        self.temperature = float(getattr(self.loss, "temperature", 1.0))
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None
        self.history = TGTHistory()
        self.step = 0
        self.rank, self.world_size = 0, 1
        self._perm: Optional[Tuple[int, torch.Tensor]] = None  # (epoch, its example order)

    # ----------------------------------------------------------------------------------------------- set-up

    def fingerprint(self) -> str:
        """A hash of everything that decides the trained weights: the config fields that matter, the loss and
        the student's parameter names and shapes. A checkpoint resumes only a run with the same fingerprint."""
        cfg = {k: v for k, v in self.config.to_dict().items() if k not in _NOT_FINGERPRINTED}
        loss_desc = type(self.loss).__name__
        if isinstance(self.loss, nn.Module):
            loss_desc += "(" + self.loss.extra_repr() + ")"
            for k, v in self.loss.state_dict().items():
                loss_desc += f";{k}={v.detach().cpu().double().flatten().tolist()}"
        shapes = [(k, tuple(v.shape)) for k, v in self.student.state_dict().items()]
        blob = json.dumps({"config": cfg, "loss": loss_desc, "student": shapes}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def _resolve_device(self) -> torch.device:
        dev = self.config.device
        if dev is None:
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(dev)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"config.device={self.config.device!r} but CUDA is not available")
            if device.index is None:
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
        return device

    def _setup_distributed(self, device: torch.device) -> bool:
        """Join the process group when launched by torchrun; returns whether this call created it."""
        import torch.distributed as dist

        world = int(os.environ.get("WORLD_SIZE", "1"))
        created = False
        if world > 1 and dist.is_available() and not dist.is_initialized():
            backend = self.config.distributed_backend or ("nccl" if device.type == "cuda" else "gloo")
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend=backend)
            created = True
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        else:
            self.rank, self.world_size = 0, 1
        return created

    def _make_optimizer(self, params) -> torch.optim.Optimizer:
        c = self.config
        if self._optimizer_factory is not None:
            opt = self._optimizer_factory(params)
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"the optimizer factory returned {type(opt).__name__}, not a torch.optim.Optimizer")
            return opt
        if c.optimizer == "sgd":
            return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        cls = torch.optim.AdamW if c.optimizer == "adamw" else torch.optim.Adam
        return cls(params, lr=c.lr, weight_decay=c.weight_decay)

    def _make_scheduler(self, opt: torch.optim.Optimizer, total: int):
        c = self.config

        def factor(step: int) -> float:
            if c.warmup_steps and step < c.warmup_steps:
                return (step + 1) / (c.warmup_steps + 1)
            if c.lr_schedule == "constant":
                return 1.0
            span = max(total - c.warmup_steps, 1)
            frac = min(max(step - c.warmup_steps, 0) / span, 1.0)
            return 0.5 * (1 + math.cos(math.pi * frac)) if c.lr_schedule == "cosine" else 1.0 - frac

        return torch.optim.lr_scheduler.LambdaLR(opt, factor)

    def _freeze_teacher(self) -> None:
        for mod in (self.labeler, self.decoder, self.encoder):
            if isinstance(mod, nn.Module):
                mod.eval()
                for p in mod.parameters():
                    p.requires_grad_(False)

    def _to_device(self, device: torch.device) -> None:
        for mod in (self.student, self.labeler, self.decoder, self.encoder, self.loss):
            if isinstance(mod, nn.Module):
                mod.to(device)

    def _load_batch(self, dataset, collate, indices: Sequence[int], device: torch.device, batch: Any = None):
        if batch is not None:  # collated by a DataLoader worker
            pass
        elif isinstance(dataset, _TensorPairs):  # rows of tensors: one gather instead of a per-example collate
            ii = torch.as_tensor(list(indices), dtype=torch.long)
            batch = tuple(t[ii] for t in dataset.tensors)
        else:
            batch = collate([dataset[int(i)] for i in indices])
        out = self.batch_fn(batch)
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise TypeError(f"batch_fn must return (inputs, labels), got {type(out).__name__}")
        x, y = out
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"batch_fn must return inputs as a tensor, got {type(x).__name__}")
        x = x.to(device)
        if y is not None:
            if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.dtype == torch.bool:
                raise TypeError("batch_fn must return labels as an integer tensor (class indices) or None")
            if y.shape != (x.shape[0],):
                raise ValueError(f"labels must have shape [{x.shape[0]}], got {tuple(y.shape)}")
            y = y.to(device=device, dtype=torch.long)
        return x, y

    def _probe(self, dataset, collate, device: torch.device) -> None:
        """Run the models once on two training examples: shape errors surface before anything is written."""
        idx = list(range(min(2, len(dataset))))
        x, y = self._load_batch(dataset, collate, idx, device)
        was_training = self.student.training
        self.student.eval()  # no dropout draws, no batch-norm statistics updates
        try:
            self._probe_models(x, y)
        finally:
            self.student.train(was_training)

    def _probe_models(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> None:
        with torch.no_grad():
            t = self.labeler(x)
            s = self.student(x)
            for name, out in (("labeler", t), ("student", s)):
                if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
                    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                    raise ValueError(f"{name} must map a batch of {x.shape[0]} inputs to logits [N, K], got {shape}")
            self._widths = ((t.shape[1],), (0, torch.float32))
            if s.shape[1] != t.shape[1]:
                raise ValueError(
                    f"the student's output width ({s.shape[1]}) differs from the labeler's ({t.shape[1]}): both "
                    "must produce logits over the same classes"
                )
            if y is not None and y.numel() and bool(((y >= s.shape[1]) | ((y < 0) & (y != -100))).any()):
                raise ValueError(f"labels must be in [0, {s.shape[1]}) or -100 (unlabelled)")
            if self.config.exploration != "none":
                z = self.encoder(x)
                if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[0] != x.shape[0]:
                    shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
                    raise ValueError(f"encoder must map a batch of {x.shape[0]} inputs to latent codes [N, d], got {shape}")
                self._widths = ((t.shape[1],), (z.shape[1], z.dtype))
                try:
                    xd = self.decoder(z)
                except Exception as exc:
                    raise ValueError(f"decoder cannot take the encoder's latent codes {tuple(z.shape)}: {exc}") from exc
                if not isinstance(xd, torch.Tensor) or xd.shape[1:] != x.shape[1:]:
                    shape = tuple(xd.shape) if isinstance(xd, torch.Tensor) else type(xd).__name__
                    raise ValueError(
                        f"the decoder's output {shape} is not shaped like the inputs {tuple(x.shape)}: the student "
                        "and labeler could not take the decoded samples"
                    )
                try:
                    sd = self.student(xd)
                except Exception as exc:
                    raise ValueError(f"the student cannot take the decoder's output {tuple(xd.shape)}: {exc}") from exc
                if not isinstance(sd, torch.Tensor) or sd.shape != s.shape:
                    raise ValueError("the student's output on decoded samples is not shaped like its output on inputs")

    # ----------------------------------------------------------------------------------------------- schedule

    def _plan(self, n: int) -> Tuple[int, int, int]:
        """(micro-batches per epoch, optimiser steps per epoch, total steps)."""
        c = self.config
        if c.batch_size < self.world_size:
            raise ValueError(f"config.batch_size ({c.batch_size}) is the global micro-batch and must be at least the "
                             f"number of processes ({self.world_size})")
        full, rest = divmod(n, c.batch_size)
        micro = full + (1 if rest and not c.drop_last and rest >= self.world_size else 0)
        if micro == 0:
            raise ValueError(
                f"the training set ({n} examples) gives no micro-batch of batch_size={c.batch_size} "
                f"(drop_last={c.drop_last}, {self.world_size} processes)"
            )
        spe = math.ceil(micro / c.grad_accum_steps)
        total = c.max_steps if c.max_steps is not None else c.epochs * spe
        return micro, spe, total

    def _step_batches(self, step: int, n: int, micro: int, spe: int) -> Tuple[int, List[Tuple[int, List[int], int, int]]]:
        """Epoch and this rank's micro-batches of optimiser step ``step``: (micro index, local example indices,
        position of the first local example in the global micro-batch, global micro-batch size)."""
        c = self.config
        epoch, k = divmod(step, spe)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(_mix(c.seed, epoch, 0x5EED))
            self._perm = (epoch, torch.randperm(n, generator=g))
        perm = self._perm[1]
        out = []
        for m in range(k * c.grad_accum_steps, min((k + 1) * c.grad_accum_steps, micro)):
            pos = perm[m * c.batch_size:min((m + 1) * c.batch_size, n)]
            size = pos.numel()
            base, extra = divmod(size, self.world_size)
            start = self.rank * base + min(self.rank, extra)
            count = base + (1 if self.rank < extra else 0)
            out.append((m - k * c.grad_accum_steps, pos[start:start + count].tolist(), start, size))
        return epoch, out

    # ----------------------------------------------------------------------------------------------- cache

    def _teacher_cache(self, dataset, collate, device: torch.device, progress: bool):
        """Enc(x) and h(x) of every training example (index order), computed once. Under torchrun each rank
        computes a contiguous shard and the shards are all-gathered."""
        import torch.distributed as dist

        n = len(dataset)
        per = math.ceil(n / self.world_size)
        lo, hi = min(self.rank * per, n), min((self.rank + 1) * per, n)
        bs = max(self.config.batch_size, 256)
        explore = self.config.exploration != "none"
        zs, ts = [], []
        bar = _progress(range(lo, hi, bs), progress, desc="teacher cache", total=math.ceil((hi - lo) / bs))
        with torch.no_grad():
            for i in bar:
                x, _ = self._load_batch(dataset, collate, list(range(i, min(i + bs, hi))), device)
                ts.append(self.labeler(x).float())
                if explore:
                    zs.append(self.encoder(x))
        (k,), (d, z_dtype) = self._widths
        t = torch.cat(ts) if ts else torch.zeros(0, k, device=device)
        z = (torch.cat(zs) if zs else torch.zeros(0, d, dtype=z_dtype, device=device)) if explore else None
        if self.world_size > 1:
            def gather(part: torch.Tensor) -> torch.Tensor:
                padded = torch.zeros((per,) + tuple(part.shape[1:]), dtype=part.dtype, device=device)
                padded[:part.shape[0]] = part
                out = [torch.empty_like(padded) for _ in range(self.world_size)]
                dist.all_gather(out, padded)
                return torch.cat(out)[:n]

            t = gather(t)
            z = gather(z) if explore else None
        return z, t

    # ----------------------------------------------------------------------------------------------- the step

    def _loss_sum(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Sum over rows of l_d(s, t) (the loss is called once, on the whole block)."""
        out = self.loss(s, t)
        red = getattr(self.loss, "reduction", "batchmean")
        if red == "sum":
            return out
        if red == "none" or out.dim() > 0:
            return out.sum()
        return out * s.shape[0]

    def _soft_labels_as_logits(self, p: torch.Tensor) -> torch.Tensor:
        """Teacher logits equivalent to the soft labels ``p = softmax(h / T)``: ``T log p = h - const``."""
        return torch.log(p.float().clamp_min(torch.finfo(torch.float32).tiny)) * self.temperature

    def _explore(self, z0: torch.Tensor, step: int, micro: int, start: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """New samples ``x'`` and teacher logits ``h(x')`` for the latent codes ``z0`` ([n, d]) of a rank's share
        of a micro-batch whose first example sits at position ``start`` of the global micro-batch."""
        c = self.config
        S = c.samples_per_example
        z = z0.repeat_interleave(S, dim=0) if S > 1 else z0
        d = z.shape[1]
        pdl = _perturb_decode_label()
        offset = start * S * d
        T = self.temperature
        if c.exploration == "random":
            with torch.no_grad():
                x_new, p = pdl(z, self.decoder, self.labeler, sigma=c.sigma, seed=noise_seed(c.seed, step, micro, 0),
                               offset=offset, temperature=T)
            return x_new.detach(), self._soft_labels_as_logits(p).detach()
        # gradient exploration
        import tgtfast

        anchor = z.detach()
        if c.sigma > 0:
            seed0 = noise_seed(c.seed, step, micro, 0)
            if hasattr(tgtfast, "perturb"):
                z = tgtfast.perturb(anchor, c.sigma, seed0, offset)
            else:
                from tgtfast import reference

                z = anchor + c.sigma * reference.latent_noise(tuple(anchor.shape), seed0, offset, device=anchor.device,
                                                              dtype=anchor.dtype)
        z = z.detach()
        student = self.student
        was_training = student.training
        student.eval()
        try:
            for _ in range(c.explore_steps):
                z.requires_grad_(True)
                with torch.enable_grad():
                    x_new, p = pdl(z, self.decoder, self.labeler, sigma=0.0, seed=0, offset=0, temperature=T)
                    with self._autocast(z.device):
                        s = student(x_new)
                    div = self._loss_sum(s.float(), self._soft_labels_as_logits(p))
                    (g,) = torch.autograd.grad(div, z)
                with torch.no_grad():
                    if c.explore_normalize:
                        g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
                    z = z.detach() + c.explore_step_size * g
                    if c.explore_radius is not None:
                        delta = z - anchor
                        norm = delta.norm(dim=1, keepdim=True)
                        z = anchor + delta * (c.explore_radius / norm.clamp_min(c.explore_radius))
        finally:
            student.train(was_training)
        with torch.no_grad():
            x_new, p = pdl(z.detach(), self.decoder, self.labeler, sigma=0.0, seed=0, offset=0, temperature=T)
        return x_new.detach(), self._soft_labels_as_logits(p).detach()

    def _autocast(self, device: torch.device):
        if not self.config.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    def _train_step(self, step: int, batches, data, device: torch.device, model: nn.Module) -> Dict[str, float]:
        """One optimiser step over this rank's micro-batches; returns the step's global metrics."""
        import torch.distributed as dist

        c = self.config
        dataset, collate, cache_z, cache_t, fetch = data
        loaded = []
        for micro, idx, start, _ in batches:
            x, y = self._load_batch(dataset, collate, idx, device, None if fetch is None else fetch())
            loaded.append((micro, idx, start, x, y))
        # Normalisers: global counts over all accumulated micro-batches and ranks.
        n_all = sum(size for *_, size in batches)
        n_lab_local = sum(int((y != -100).sum()) if y is not None else 0 for *_, y in loaded)
        counts = torch.tensor([float(n_lab_local)], dtype=torch.float64)
        distributed = self.world_size > 1
        if distributed:
            counts = counts.to(device)
            dist.all_reduce(counts)
        n_lab = float(counts[0])
        S = c.samples_per_example
        explore = c.exploration != "none"
        sums = torch.zeros(5, dtype=torch.float64, device=device)  # ce, kd, tgt, correct, examples (local sums)
        for j, (micro, idx, start, x, y) in enumerate(loaded):
            if cache_t is not None:
                ii = torch.as_tensor(idx, dtype=torch.long, device=device)
                t = cache_t[ii]
                z0 = cache_z[ii] if explore else None
            else:
                with torch.no_grad():
                    t = self.labeler(x).float()
                    z0 = self.encoder(x) if explore else None
            nx = x.shape[0]
            if explore and c.w_tgt > 0:
                x_new, t_new = self._explore(z0, step, micro, start)
                inputs = torch.cat([x, x_new.to(x.dtype)])
            else:
                inputs, t_new = x, None
            last = j == len(loaded) - 1
            sync = model.no_sync() if (distributed and not last and hasattr(model, "no_sync")) else contextlib.nullcontext()
            with sync:
                with self._autocast(device):
                    logits = model(inputs)
                logits = logits.float()
                s, s_new = logits[:nx], logits[nx:]
                if y is not None and n_lab > 0:
                    ce = TF.cross_entropy(s, y, ignore_index=-100, reduction="sum")
                else:
                    ce = s.sum() * 0.0
                kd = self._loss_sum(s, t) if c.w_kd > 0 else s.sum() * 0.0
                tgt = self._loss_sum(s_new, t_new) if t_new is not None else s.sum() * 0.0
                total = c.w_ce * ce / max(n_lab, 1.0) + c.w_kd * kd / n_all + c.w_tgt * tgt / (n_all * S)
                # DDP averages the ranks' gradients; the global normalisers already account for every rank.
                (total * self.world_size).backward()
            with torch.no_grad():
                correct = (s.argmax(1) == y).sum() if y is not None else torch.zeros((), device=device)
                sums += torch.stack([ce.detach().double(), kd.detach().double(), tgt.detach().double(),
                                     correct.double(), torch.tensor(float(nx), dtype=torch.float64, device=device)])
        if c.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), c.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if distributed:
            dist.all_reduce(sums)
        ce_m = float(sums[0]) / max(n_lab, 1.0)
        kd_m = float(sums[1]) / n_all
        tgt_m = float(sums[2]) / (n_all * S) if explore and c.w_tgt > 0 else 0.0
        return {
            "loss": c.w_ce * ce_m + c.w_kd * kd_m + c.w_tgt * tgt_m,
            "ce": ce_m, "kd": kd_m, "tgt": tgt_m,
            "acc": float(sums[3]) / n_lab if n_lab > 0 else float("nan"),
            "lr": lr, "examples": n_all, "samples": n_all * (1 + (S if explore and c.w_tgt > 0 else 0)),
        }

    # ----------------------------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self, data: Any) -> Dict[str, float]:
        """Accuracy and CE on the labelled examples of ``data`` and KD loss to the labeler on all of them."""
        dataset, collate = _as_dataset(data, "val")
        n = len(dataset)
        if n == 0:
            raise ValueError("val is empty")
        device = next(self.student.parameters()).device
        was = self.student.training
        self.student.eval()
        correct = ce = kd = lab = 0.0
        try:
            bs = max(self.config.batch_size, 256)
            for i in range(0, n, bs):
                x, y = self._load_batch(dataset, collate, list(range(i, min(i + bs, n))), device)
                with self._autocast(device):
                    s = self.student(x)
                s = s.float()
                kd += float(self._loss_sum(s, self.labeler(x).float()))
                if y is not None:
                    keep = y != -100
                    lab += float(keep.sum())
                    if keep.any():
                        correct += float((s[keep].argmax(1) == y[keep]).sum())
                        ce += float(TF.cross_entropy(s[keep], y[keep], reduction="sum"))
        finally:
            self.student.train(was)
        return {"val_acc": correct / lab if lab else float("nan"), "val_ce": ce / lab if lab else float("nan"),
                "val_kd": kd / n}

    # ----------------------------------------------------------------------------------------------- checkpoints

    def _ckpt_path(self) -> Optional[str]:
        return None if self.config.out_dir is None else os.path.join(self.config.out_dir, "checkpoint.pt")

    def _rng_state(self) -> Dict[str, Any]:
        state = {"cpu": torch.get_rng_state()}
        device = next(self.student.parameters()).device
        if device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(device)
        return state

    def _set_rng_state(self, state: Dict[str, Any]) -> None:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], next(self.student.parameters()).device)

    def _save_checkpoint(self) -> None:
        """Write the checkpoint (rank 0); every rank must call it (the ranks' generator states are gathered)."""
        path = self._ckpt_path()
        if path is None:
            return
        rngs = [self._rng_state()]
        if self.world_size > 1:
            import torch.distributed as dist

            rngs = [None] * self.world_size
            dist.all_gather_object(rngs, self._rng_state())
        if self.rank != 0:
            return
        state = {
            "fingerprint": self.fingerprint(),
            "step": self.step,
            "student": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rngs,  # per rank: dropout draws continue where they stopped
            "history": self.history.to_dict(),
            "config": self.config.to_dict(),
        }
        _atomic_write(path, lambda fh: torch.save(state, fh), binary=True)

    def _read_checkpoint(self) -> Optional[Dict[str, Any]]:
        """The checkpoint to resume from (validated), or None for a fresh run. Raises before anything is written."""
        path = self._ckpt_path()
        if path is None or not os.path.exists(path):
            return None
        if not self.config.resume:
            if self.config.overwrite:
                return None
            raise ValueError(
                f"{path} exists: pass resume=True to continue that run or overwrite=True to replace it"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise ValueError(f"cannot read the checkpoint {path}: {exc}") from exc
        if not isinstance(state, dict) or "fingerprint" not in state:
            raise ValueError(f"{path} is not a tgtfast trainer checkpoint")
        mine = self.fingerprint()
        if state["fingerprint"] != mine:
            diff = {k: (v, state.get("config", {}).get(k)) for k, v in self.config.to_dict().items()
                    if k not in _NOT_FINGERPRINTED and state.get("config", {}).get(k) != v}
            raise ValueError(
                f"the checkpoint {path} comes from another configuration (fingerprint {state['fingerprint']} vs "
                f"{mine}); differing fields (now, then): {diff or 'the loss or the student architecture'}"
            )
        return state

    # ----------------------------------------------------------------------------------------------- fit

    def fit(self, train: Any, val: Any = None, *,
            callback: Optional[Callable[["TGTTrainer", Dict[str, float]], None]] = None) -> TGTHistory:
        """Train the student on ``train`` (evaluating on ``val`` if given) and return the :class:`TGTHistory`.

        ``train``/``val``: a map-style dataset, a DataLoader over one (its dataset and collate function are
        used; the trainer does its own sampling), or a tuple of tensors ``(x, y)``. ``callback(trainer, record)``
        is called on every process after every optimiser step with that step's metrics.
        Under ``torchrun`` (``WORLD_SIZE > 1``) the student is wrapped in DistributedDataParallel, each rank
        takes its contiguous share of every global micro-batch, and only rank 0 writes files.
        """
        import torch.distributed as dist

        dataset, collate = _as_dataset(train, "train")
        n = len(dataset)
        if n == 0:
            raise ValueError("train is empty: the training set has no examples")
        if val is not None:
            vds, _ = _as_dataset(val, "val")
            if len(vds) == 0:
                raise ValueError("val is empty: pass val=None or a non-empty validation set")
        device = self._resolve_device()
        created_pg = self._setup_distributed(device)
        try:
            return self._fit(dataset, collate, n, val, device, callback)
        finally:
            if created_pg and dist.is_initialized():
                dist.destroy_process_group()

    def _fit(self, dataset, collate, n, val, device, callback) -> TGTHistory:
        import torch.distributed as dist

        c = self.config
        self._perm = None
        self._to_device(device)
        self._freeze_teacher()
        self._probe(dataset, collate, device)
        micro, spe, total = self._plan(n)
        state = self._read_checkpoint()  # raises (before anything is written) on a mismatch
        progress = (self.rank == 0) and (c.progress if c.progress is not None else sys.stderr.isatty())

        torch.manual_seed(_mix(c.seed, self.rank, 0xD0))
        self.optimizer = self._make_optimizer(self.student.parameters())
        self.scheduler = self._make_scheduler(self.optimizer, total)
        self.step = 0
        self.history = TGTHistory()
        if state is not None:
            try:
                self.student.load_state_dict(state["student"])
            except RuntimeError as exc:
                raise ValueError(f"the checkpoint's student weights do not fit this student: {exc}") from exc
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.step = int(state["step"])
            self.history = TGTHistory(**state["history"])
            if len(state["rng"]) == self.world_size:
                self._set_rng_state(state["rng"][self.rank])
            elif self.rank == 0:
                warnings.warn(f"the checkpoint was written by {len(state['rng'])} processes, this run has "
                              f"{self.world_size}: random draws of the student (dropout) restart from the seed")
        if self.rank == 0 and c.out_dir is not None:
            os.makedirs(c.out_dir, exist_ok=True)
            _truncate_metrics(os.path.join(c.out_dir, "metrics.jsonl"), self.step)

        model: nn.Module = self.student
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(self.student, device_ids=[device.index] if device.type == "cuda" else None)
        self.student.train()

        cache_z = cache_t = None
        if c.cache_teacher:
            cache_z, cache_t = self._teacher_cache(dataset, collate, device, progress)
        fetch = None
        if c.num_workers > 0 and not isinstance(dataset, _TensorPairs):
            loader = torch.utils.data.DataLoader(
                dataset, batch_sampler=_StepSampler(self, self.step, total, n, micro, spe), collate_fn=collate,
                num_workers=c.num_workers)
            batches_iter = iter(loader)
            fetch = lambda: next(batches_iter)  # noqa: E731 - in the sampler's order, which is the loop's
        data = (dataset, collate, cache_z, cache_t, fetch)

        metrics_path = os.path.join(c.out_dir, "metrics.jsonl") if (c.out_dir and self.rank == 0) else None
        bar = _progress(range(self.step, total), progress, desc="train", total=total, initial=self.step)
        for step in bar:
            t0 = time.perf_counter()
            epoch, batches = self._step_batches(step, n, micro, spe)
            rec = self._train_step(step, batches, data, device, model)
            dt = time.perf_counter() - t0
            self.step = step + 1
            record = {"step": self.step, "epoch": epoch, "lr": rec["lr"], "loss": rec["loss"], "ce": rec["ce"],
                      "kd": rec["kd"], "tgt": rec["tgt"], "acc": rec["acc"],
                      "examples_per_s": rec["examples"] / dt, "samples_per_s": rec["samples"] / dt}
            last = self.step == total
            if self.step % c.log_every == 0 or last:
                self.history.train.append(record)
                if metrics_path:
                    _append_jsonl(metrics_path, record)
            if val is not None and self.rank == 0 and ((c.eval_every and self.step % c.eval_every == 0) or last):
                vrec = {"step": self.step, **self.evaluate(val)}
                self.history.val.append(vrec)
                if metrics_path:
                    _append_jsonl(metrics_path, vrec)
            self.history.steps = self.step
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
            if c.checkpoint_every and self.step % c.checkpoint_every == 0 and not last:
                self._save_checkpoint()
            if callback is not None:
                callback(self, record)
        if self.world_size > 1 and val is not None:
            # Rank 0's evaluations reach the other ranks' histories.
            obj = [self.history.val]
            dist.broadcast_object_list(obj, src=0)
            self.history.val = obj[0]
        self.history.steps = self.step
        self._save_checkpoint()
        if c.out_dir is not None and self.rank == 0:
            _atomic_write(os.path.join(c.out_dir, "history.json"),
                          lambda fh: fh.write(json.dumps(self.history.to_dict(), indent=1)))
            if c.plot:
                plot_history(self.history, os.path.join(c.out_dir, "curves.png"))
        if self.world_size > 1:
            dist.barrier()
        return self.history


# ---------------------------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------------------------


def _atomic_write(path: str, write: Callable[[Any], Any], *, binary: bool = False) -> None:
    """Write ``path`` through a temporary file in the same directory and rename it over the target."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _append_jsonl(path: str, record: Dict[str, Any]) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def _truncate_metrics(path: str, step: int) -> None:
    """Drop metrics lines past ``step`` (a resumed run writes them again); a fresh run starts the file anew."""
    if not os.path.exists(path):
        return
    keep = []
    if step > 0:
        with open(path) as fh:
            for line in fh:
                try:
                    if json.loads(line).get("step", 0) <= step:
                        keep.append(line if line.endswith("\n") else line + "\n")
                except json.JSONDecodeError:
                    break
    _atomic_write(path, lambda fh: fh.writelines(keep))


def plot_history(history: TGTHistory, path: str) -> bool:
    """Plot the loss terms and accuracies against the step as a PNG (matplotlib, Agg). Returns False when
    matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    steps = [r["step"] for r in history.train]
    for key in ("loss", "ce", "kd", "tgt"):
        ax1.plot(steps, [r[key] for r in history.train], label=key)
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax2.plot(steps, [r["acc"] for r in history.train], label="train acc (labelled)")
    if history.val:
        ax2.plot([r["step"] for r in history.val], [r["val_acc"] for r in history.val], "o-", label="val acc")
    ax2.set_xlabel("step")
    ax2.set_ylabel("accuracy")
    ax2.legend()
    fig.tight_layout()
    _atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=100), binary=True)
    plt.close(fig)
    return True


def _progress(iterable, enabled: bool, **kw):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, **kw)
