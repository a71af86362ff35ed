"""The settings of a Teacher Guided Training run: :class:`TGTConfig`, every field checked when it is built."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from tgtfast import validation

__all__ = ["TGTConfig", "EXPLORATIONS", "OPTIMIZERS", "SCHEDULES", "DISTRIBUTED_BACKENDS", "DEFAULT_MAX_STEPS",
           "SHORT_RUN_STEPS", "ShortRunWarning"]

EXPLORATIONS = ("none", "random", "gradient", "input")
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "cosine", "linear")
DISTRIBUTED_BACKENDS = ("gloo", "nccl", "mpi")
DEFAULT_MAX_STEPS = 1000  # the run length when neither max_steps nor epochs is set
SHORT_RUN_STEPS = 50  # a run of fewer optimiser steps, counted from epochs, is warned about


class ShortRunWarning(UserWarning):
    """A run whose length comes from ``epochs`` has fewer than :data:`SHORT_RUN_STEPS` optimiser steps (e.g. one
    epoch of a small dataset): it rarely trains a model. Set ``max_steps`` to say how many steps you want."""

_FIELD_DOCS = {
    "w_ce": "weight of CE(f(x), y) on the labelled examples (>= 0)",
    "w_kd": "weight of the distillation term l_d(f(x), h(x)) on the training inputs (>= 0)",
    "w_tgt": "weight of the distillation term l_d(f(x'), h(x')) on the generated samples (>= 0)",
    "exploration": "how new samples are made: 'none' (plain distillation), 'random' (latent noise), 'gradient' "
                   "(latent gradient ascent on the student-teacher divergence) or 'input' (Gaussian noise added to "
                   "the inputs themselves, no generator: the baseline latent exploration is compared with)",
    "sigma": "standard deviation of the latent noise (>= 0); in 'gradient' mode the noise of the starting point, in "
             "'input' mode the noise added to every input element",
    "samples_per_example": "new samples per training example and step (>= 1)",
    "explore_steps": "gradient-ascent steps in 'gradient' mode (>= 1)",
    "explore_step_size": "ascent step size in latent space (> 0)",
    "explore_normalize": "divide each row's latent gradient by its L2 norm, so that a step moves each code by "
                         "exactly explore_step_size; false: plain gradient ascent on the summed divergence",
    "explore_radius": "if set, keep every explored code within this L2 distance of Enc(x) (projection)",
    "batch_size": "examples per micro-batch over all processes (the global micro-batch, split between ranks)",
    "labelled_per_batch": "labelled examples in every global micro-batch, the rest unlabelled (from fit(..., "
                          "unlabelled=...), else the examples of train labelled -100), so that no batch lacks labels; "
                          "null: with an unlabelled stream the pools' proportion (at least 1), without one batches "
                          "are drawn from all examples alike",
    "grad_accum_steps": "micro-batches per optimiser step; the loss is normalised by the total number of examples "
                        "in them (labelled examples for the CE term)",
    "epochs": "passes over the training set (ignored when max_steps is set); a run counted in epochs that has "
              "fewer than 50 optimiser steps gets a ShortRunWarning",
    "max_steps": "optimiser steps to run; overrides epochs. With neither set, a run is 1000 optimiser steps",
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
    "imperfect": "distillation from an imperfect teacher (tgtfast.imperfect): 'none', 'weighted' (rows weighted by "
                 "the teacher's estimated accuracy alpha(x); needs a KDLoss) or 'slam' (SLaM's loss at the KDLoss's "
                 "temperature); the reliability is fitted on the labelled rows of val unless given to TGTTrainer",
    "active_pool": "propose this many times more new samples than are kept, without labelling them, and keep "
                   "samples_per_example per example on average by robust active selection (the student's "
                   "informativeness against the teacher's correctness estimated from the student's margin); only "
                   "the kept samples are labelled by the teacher (1: keep and label every sample; needs exploration)",
    "active_refit_every": "refit the teacher's estimated correctness against the student's margin on val every N "
                          "steps (0: once, before the first step)",
    "reliability_bins": "bins of the teacher's reliability estimate and of the correctness curve of active_pool "
                        "(needs 25 labelled val rows per bin)",
    "ece_bins": "equal-width confidence bins of the expected calibration error reported by evaluation (>= 1)",
    "progress": "show a tqdm progress bar; null: when stderr is a terminal",
    "plot": "write curves.png at the end (needs matplotlib)",
    "distributed_backend": "process-group backend under torchrun: 'gloo', 'nccl' or 'mpi'; null: NCCL on CUDA, "
                           "gloo on CPU",
}

# Range of every numeric field: (low, low inclusive). Fields not named here have no bound.
_BOUNDS = {
    "w_ce": (0.0, True), "w_kd": (0.0, True), "w_tgt": (0.0, True), "sigma": (0.0, True),
    "weight_decay": (0.0, True), "momentum": (0.0, True),
    "explore_step_size": (0.0, False), "lr": (0.0, False), "explore_radius": (0.0, False),
    "grad_clip": (0.0, False),
    "samples_per_example": (1, True), "explore_steps": (1, True), "batch_size": (1, True),
    "labelled_per_batch": (1, True),
    "grad_accum_steps": (1, True), "epochs": (1, True), "max_steps": (1, True), "log_every": (1, True),
    "warmup_steps": (0, True), "checkpoint_every": (0, True), "eval_every": (0, True), "seed": (0, True),
    "ece_bins": (1, True), "active_pool": (1, True), "active_refit_every": (0, True), "reliability_bins": (1, True),
    "num_workers": (0, True),
}
_CHOICES = {"imperfect": ("none", "weighted", "slam"), "exploration": EXPLORATIONS, "optimizer": OPTIMIZERS,
            "lr_schedule": SCHEDULES,
            "distributed_backend": DISTRIBUTED_BACKENDS}


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
    labelled_per_batch: Optional[int] = None
    grad_accum_steps: int = 1
    epochs: Optional[int] = None
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
    ece_bins: int = 15
    imperfect: str = "none"
    active_pool: int = 1
    active_refit_every: int = 10
    reliability_bins: int = 10
    progress: Optional[bool] = None
    plot: bool = True
    distributed_backend: Optional[str] = None

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _check_field(f.name, getattr(self, f.name), hints[f.name]))
        if self.device is not None:
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ValueError(f"config.device must name a torch device, got {self.device!r}") from None
        if self.labelled_per_batch is not None and self.labelled_per_batch > self.batch_size:
            raise ValueError(f"config.labelled_per_batch ({self.labelled_per_batch}) must be at most config.batch_size "
                             f"({self.batch_size})")
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


def _check_field(name: str, value: Any, hint: Any) -> Any:
    """One field through the shared checks of :mod:`tgtfast.validation` (messages name ``config.<field>``)."""
    args = typing.get_args(hint)
    optional = bool(args) and type(None) in args
    base = [a for a in args if a is not type(None)][0] if optional else hint
    label = f"config.{name}"
    if value is None:
        if optional:
            return None
        raise TypeError(f"{label} must be {base.__name__}, got None")
    low, inclusive = _BOUNDS.get(name, (None, True))
    if base is bool:
        return validation.boolean(label, value)
    if base is int:
        return validation.integer(label, value, low=low)
    if base is float:
        return validation.real(label, value, low=low, low_inclusive=inclusive)
    if not isinstance(value, str):
        raise TypeError(f"{label} must be a string, got {type(value).__name__} {value!r}")
    if name in _CHOICES:
        validation.choice(label, value, _CHOICES[name])
    return value


TGTConfig.__doc__ = (TGTConfig.__doc__ or "") + "\n" + "\n".join(
    "    " + line for line in TGTConfig.describe().splitlines()
) + "\n"
