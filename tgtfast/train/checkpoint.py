"""The files of a run: atomic writes, the checkpoint (saved, read back and checked), the run's fingerprint,
the truncation of ``metrics.jsonl`` on resume and the removal of temporaries left by killed runs.

Checkpoints are read with ``torch.load(weights_only=True)``: a file holding anything but tensors and plain
containers (a pickle that would run code) is refused before any of it is built.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import socket
import tempfile
import time
from typing import Any, Callable, Dict, List, Sequence

import torch
from torch import nn

__all__ = [
    "CHECKPOINT_NAME",
    "OUTPUT_NAMES",
    "NOT_FINGERPRINTED",
    "atomic_write",
    "fingerprint",
    "load_checkpoint",
    "remove_stale_temporaries",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "truncate_metrics",
]

CHECKPOINT_NAME = "checkpoint.pt"
OUTPUT_NAMES = (CHECKPOINT_NAME, "metrics.jsonl", "history.json", "curves.png")  # the files rank 0 writes

# Fields that change how a run is observed or stored, not the weights it produces: left out of the fingerprint
# that a resumed run must match.
NOT_FINGERPRINTED = frozenset(
    {"out_dir", "checkpoint_every", "resume", "overwrite", "log_every", "eval_every", "progress", "plot",
     "device", "distributed_backend", "num_workers", "ece_bins"}
)

_REQUIRED = ("fingerprint", "step", "student", "optimizer", "scheduler", "rng", "history", "config")
_STALE_FOREIGN_S = 600.0  # a temporary of another machine untouched this long belongs to no live writer


# ----------------------------------------------------------------------------------------------- atomic writes


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _temp_prefix(name: str) -> str:
    """Temporaries of ``name`` are ``.<name>.tmp-<host>-<pid>-<random>.tmp``: the writer can be told dead."""
    return f".{name}.tmp-{_host()}-{os.getpid()}-"


def atomic_write(path: str, write: Callable[[Any], Any], *, binary: bool = False) -> None:
    """Write ``path`` through a temporary file in the same directory and rename it over the target."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(os.path.basename(path)), suffix=".tmp", dir=directory)
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale_temporaries(out_dir: str, names: Sequence[str] = OUTPUT_NAMES) -> List[str]:
    """Delete the temporaries that killed runs left beside ``out_dir``'s output files ``names``; returns them.

    Only files of :func:`atomic_write`'s naming for those names are considered, never a finished file:
    ``.<name>.tmp-<host>-<pid>-*.tmp`` of this machine whose process is gone, of another machine when untouched
    for 10 minutes, and ``.<name>.XXXXXXXX.tmp`` of earlier versions (which named no writer)."""
    if not os.path.isdir(out_dir):
        return []
    host, removed = _host(), []
    for entry in os.listdir(out_dir):
        for name in names:
            new = re.fullmatch(rf"\.{re.escape(name)}\.tmp-(.+)-(\d+)-[a-z0-9_]+\.tmp", entry)
            legacy = re.fullmatch(rf"\.{re.escape(name)}\.[a-z0-9_]{{8}}\.tmp", entry)
            if not (new or legacy):
                continue
            path = os.path.join(out_dir, entry)
            if new:
                if new.group(1) == host:
                    if _pid_alive(int(new.group(2))):
                        break
                else:
                    with contextlib.suppress(OSError):
                        if time.time() - os.path.getmtime(path) < _STALE_FOREIGN_S:
                            break
            with contextlib.suppress(OSError):
                if os.path.isfile(path) and not os.path.islink(path):
                    os.unlink(path)
                    removed.append(path)
            break
    return removed


def truncate_metrics(path: str, step: int) -> None:
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
    atomic_write(path, lambda fh: fh.writelines(keep))


# ----------------------------------------------------------------------------------------------- identity


def fingerprint(config: Any, loss: Any, student: nn.Module) -> str:
    """A hash of everything that decides the trained weights: the config fields that matter, the loss and the
    student's parameter names and shapes."""
    cfg = {k: v for k, v in config.to_dict().items() if k not in NOT_FINGERPRINTED}
    loss_desc = type(loss).__name__
    if isinstance(loss, nn.Module):
        loss_desc += "(" + loss.extra_repr() + ")"
        for k, v in loss.state_dict().items():
            loss_desc += f";{k}={v.detach().cpu().double().flatten().tolist()}"
    shapes = [(k, tuple(v.shape)) for k, v in student.state_dict().items()]
    blob = json.dumps({"config": cfg, "loss": loss_desc, "student": shapes}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- generators


def rng_state(device: torch.device) -> Dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ----------------------------------------------------------------------------------------------- save / load


def save_checkpoint(path: str, state: Dict[str, Any]) -> None:
    """Write ``state`` (tensors and plain containers only: it must load with ``weights_only=True``)."""
    atomic_write(path, lambda fh: torch.save(state, fh), binary=True)


def _unpickling_detail(exc: BaseException) -> str:
    lines = [l.strip() for l in str(exc).splitlines() if l.strip()]
    useful = [l for l in lines if "weights_only" not in l and "documentation" not in l and "PyTorch 2.6" not in l]
    return (useful or lines or [type(exc).__name__])[0]


def load_checkpoint(path: str, *, expected_fingerprint: str, config: Any, total_steps: int) -> Dict[str, Any]:
    """Read ``path`` with ``weights_only=True`` and check it before anything of it is used: the entries a
    resume needs, their kinds, the fingerprint of the run, and counters within this run's ``total_steps``.
    Every problem is a ``ValueError`` naming the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"refusing to load the checkpoint {path}: it holds objects other than tensors and plain containers, "
            f"which could run code when unpickled ({_unpickling_detail(exc)}). A tgtfast trainer checkpoint never "
            "does: if you did not write this file, delete it"
        ) from None
    except Exception as exc:
        raise ValueError(f"cannot read the checkpoint {path}: {exc}") from exc
    if not isinstance(state, dict) or "fingerprint" not in state:
        raise ValueError(f"{path} is not a tgtfast trainer checkpoint")
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise ValueError(f"the checkpoint {path} is incomplete: it has no {', '.join(map(repr, missing))} entry "
                         f"(a tgtfast trainer checkpoint holds {list(_REQUIRED)})")
    saved_config = state["config"] if isinstance(state["config"], dict) else {}
    if state["fingerprint"] != expected_fingerprint:
        diff = {k: (v, saved_config.get(k)) for k, v in config.to_dict().items()
                if k not in NOT_FINGERPRINTED and saved_config.get(k) != v}
        raise ValueError(
            f"the checkpoint {path} comes from another configuration (fingerprint {state['fingerprint']} vs "
            f"{expected_fingerprint}); differing fields (now, then): "
            f"{diff or 'the loss or the student architecture'}"
        )
    _check_contents(path, state, total_steps)
    return state


def _check_contents(path: str, state: Dict[str, Any], total: int) -> None:
    def bad(what: str) -> ValueError:
        return ValueError(f"the checkpoint {path} is damaged: {what}")

    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int):
        raise bad(f"its step is a {type(step).__name__}, not an int")
    if not 0 <= step <= total:
        raise ValueError(
            f"the checkpoint {path} is at step {step}, outside this run's 0..{total} steps (did the training set "
            "change size?); start a fresh run with overwrite=True or give it the data it was written with"
        )
    for key in ("student", "optimizer", "scheduler", "config"):
        if not isinstance(state[key], dict):
            raise bad(f"its {key!r} entry is a {type(state[key]).__name__}, not a mapping")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state["student"].items()):
        raise bad("its 'student' entry is not a state_dict of tensors")
    if not {"state", "param_groups"} <= set(state["optimizer"]):
        raise bad("its 'optimizer' entry is not an optimizer state_dict")
    last = state["scheduler"].get("last_epoch")
    if last is not None and last != step:
        raise bad(f"its counters disagree: step {step} but the learning-rate schedule is at step {last}")
    rng = state["rng"]
    if not (isinstance(rng, list) and rng and all(isinstance(r, dict) and isinstance(r.get("cpu"), torch.Tensor)
                                                  for r in rng)):
        raise bad("its 'rng' entry is not a list of generator states (one per process)")
    hist = state["history"]
    if not (isinstance(hist, dict) and {"train", "val", "steps"} <= set(hist)
            <= {"train", "val", "steps", "teacher_queries"} and isinstance(hist["train"], list)
            and isinstance(hist["val"], list) and isinstance(hist.get("teacher_queries", 0), int)):
        raise bad("its 'history' entry is not a TGTHistory (train, val, steps, teacher_queries)")
    if hist["steps"] != step:
        raise bad(f"its counters disagree: step {step} but the history ends at step {hist['steps']}")
