"""The demo's frozen teacher: labeler and VAE trained on the teacher-train split, and the checkpoint cache.

The cache file is loaded with ``torch.load(..., weights_only=True)``: the cache folder can be given by the user
(``--cache-dir``), so a file there is data, never code. A file that fails to load, is refused by the
weights-only unpickler, or was written for other settings is reported, and the teacher is retrained and the
file rewritten atomically."""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Optional, Tuple

import torch
from torch import nn

from tgtfast.demo.config import NUM_CLASSES, NUM_PIXELS, DemoConfig
from tgtfast.demo.data import DigitsSplits
from tgtfast.demo.models import TeacherVAE, accuracy, mlp


@dataclass
class Teacher:
    """The frozen teacher: ``labeler`` (logits), ``vae`` (``vae.encoder`` / ``vae.decoder``) and its metrics."""

    labeler: nn.Sequential
    vae: TeacherVAE
    metrics: Dict[str, float]
    cache_path: Optional[str] = None
    from_cache: bool = False


def _batches(n: int, batch_size: int, g: torch.Generator) -> Iterable[torch.Tensor]:
    perm = torch.randperm(n, generator=g)
    for i in range(0, n, batch_size):
        yield perm[i:i + batch_size]


def train_labeler(splits: DigitsSplits, cfg: DemoConfig) -> nn.Sequential:
    torch.manual_seed(cfg.split_seed)
    g = torch.Generator().manual_seed(cfg.split_seed)
    net = mlp([NUM_PIXELS, *cfg.labeler_hidden, NUM_CLASSES])
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.labeler_lr, weight_decay=cfg.labeler_weight_decay)
    for _ in range(cfg.labeler_epochs):
        for b in _batches(len(splits.y_train), cfg.teacher_batch_size, g):
            loss = nn.functional.cross_entropy(net(splits.x_train[b]), splits.y_train[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval()


def train_vae(splits: DigitsSplits, cfg: DemoConfig) -> TeacherVAE:
    torch.manual_seed(cfg.split_seed + 1)
    g = torch.Generator().manual_seed(cfg.split_seed + 1)
    vae = TeacherVAE(cfg.vae_hidden, cfg.vae_latent)
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr)
    for _ in range(cfg.vae_epochs):
        for b in _batches(len(splits.y_train), cfg.teacher_batch_size, g):  # images only, labels unused
            loss = vae.loss(splits.x_train[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return vae.eval()


@torch.no_grad()
def teacher_metrics(labeler: nn.Module, vae: TeacherVAE, splits: DigitsSplits) -> Dict[str, float]:
    torch.manual_seed(0)
    mu_val, _ = vae.encode(splits.x_val)
    recon = vae.decoder(mu_val)
    prior = vae.decoder(torch.randn(2000, vae.logvar.out_features))
    conf = torch.softmax(labeler(prior), -1).max(-1).values
    from tgtfast.metrics import classification_metrics

    test = classification_metrics(labeler(splits.x_test), splits.y_test)
    return {
        "labeler_test_ece": test["ece"],
        "labeler_test_nll": test["nll"],
        "labeler_val_accuracy": accuracy(labeler, splits.x_val, splits.y_val),
        "labeler_test_accuracy": accuracy(labeler, splits.x_test, splits.y_test),
        "labeler_accuracy_on_vae_reconstructions_val": accuracy(labeler, recon, splits.y_val),
        "vae_val_mean_abs_error": float((recon - splits.x_val).abs().mean()),
        "vae_val_neg_elbo": float(vae.loss(splits.x_val)),
        "labeler_mean_confidence_on_prior_samples": float(conf.mean()),
    }


def default_cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "tgtfast", "demo")


def _atomic_torch_save(obj: Any, path: str) -> None:
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _build_teacher(cfg: DemoConfig, state: Dict[str, Any]) -> Tuple[nn.Sequential, TeacherVAE]:
    labeler = build_labeler(cfg, state["labeler"])
    vae = TeacherVAE(cfg.vae_hidden, cfg.vae_latent)
    vae.load_state_dict(state["vae"])
    vae.eval().requires_grad_(False)
    return labeler, vae


def _load_state(path: str, key: Dict[str, Any], what: str, log) -> Optional[Dict[str, Any]]:
    """The state saved at ``path`` for ``key`` (weights only), or None (absent; unreadable, refused or written for
    other settings: reported through ``log``, to be retrained and rewritten)."""
    if not os.path.exists(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and state.get("key") == json.loads(json.dumps(key)):
            log(f"{what}: loaded from cache {path}")
            return state
        log(f"{what}: warning: cache file {path} was written for other settings; retraining and rewriting it")
    except Exception as exc:  # damaged, foreign or refused by the weights-only unpickler: replaced, never run
        log(f"{what}: warning: cache file {path} unreadable ({type(exc).__name__}); retraining and rewriting it")
    return None


def load_or_train_teacher(cfg: DemoConfig, splits: DigitsSplits, cache_dir: Optional[str] = None, *,
                          use_cache: bool = True, log=print) -> Teacher:
    """The teacher for ``cfg``: loaded from ``cache_dir/teacher-<hash>.pt`` when that file exists and was written
    for the same teacher settings, else trained and saved there (atomically: temporary file, then rename).

    The file is read with ``torch.load(..., weights_only=True)``, which builds tensors and plain containers only
    and refuses anything else (a pickle that would call a function, say): a cache folder given by the user is
    data, never code. A file that fails to load, is refused, or does not hold this teacher is reported through
    ``log`` (a line starting ``teacher: warning:``) and replaced by a freshly trained teacher."""
    cache_dir = default_cache_dir() if cache_dir is None else os.fspath(cache_dir)
    path = os.path.join(cache_dir, f"teacher-{cfg.teacher_hash()}.pt")
    state = _load_state(path, cfg.teacher_key(), "teacher", log) if use_cache else None
    if state is not None:
        labeler, vae = _build_teacher(cfg, state)
        return Teacher(labeler, vae, teacher_metrics(labeler, vae, splits), path, True)
    t0 = time.perf_counter()
    labeler = train_labeler(splits, cfg)
    vae = train_vae(splits, cfg)
    log(f"teacher: trained labeler and VAE in {time.perf_counter() - t0:.1f} s")
    if use_cache:
        _atomic_torch_save({"key": cfg.teacher_key(), "labeler": labeler.state_dict(), "vae": vae.state_dict()},
                           path)
        log(f"teacher: cached at {path}")
    for m in (labeler, vae):
        m.requires_grad_(False)
    return Teacher(labeler, vae, teacher_metrics(labeler, vae, splits), path if use_cache else None, False)


# ----------------------------------------------------------------------------------------------- second regime


def train_weak_labeler(splits: DigitsSplits, cfg: DemoConfig) -> nn.Sequential:
    """The second regime's labeler: the labeler's architecture trained on ``cfg.weak_teacher_labels`` stratified
    labels of teacher-train, full batch, ``cfg.weak_labeler_epochs`` steps, no weight decay (it fits them
    exactly and is overconfident elsewhere)."""
    from tgtfast.demo.data import few_label_subset

    idx = few_label_subset(splits.y_train, cfg.weak_teacher_labels, cfg.split_seed)
    x, y = splits.x_train[idx], splits.y_train[idx]
    torch.manual_seed(cfg.split_seed + 2)
    net = mlp([NUM_PIXELS, *cfg.labeler_hidden, NUM_CLASSES])
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.weak_labeler_lr, weight_decay=0.0)
    for _ in range(cfg.weak_labeler_epochs):
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()


@torch.no_grad()
def weak_teacher_metrics(labeler: nn.Module, splits: DigitsSplits) -> Dict[str, float]:
    """The second regime's labeler on validation and test: accuracy, ECE, NLL and mean confidence."""
    from tgtfast.metrics import classification_metrics

    out: Dict[str, float] = {}
    for split in ("val", "test"):
        logits = labeler(getattr(splits, f"x_{split}"))
        m = classification_metrics(logits, getattr(splits, f"y_{split}"))
        out.update({f"labeler_{split}_accuracy": m["accuracy"], f"labeler_{split}_ece": m["ece"],
                    f"labeler_{split}_nll": m["nll"],
                    f"labeler_{split}_mean_confidence": float(torch.softmax(logits, -1).max(-1).values.mean())})
    return out


def build_labeler(cfg: DemoConfig, state: Dict[str, Any]) -> nn.Sequential:
    """A frozen labeler of ``cfg``'s architecture with the weights ``state``."""
    labeler = mlp([NUM_PIXELS, *cfg.labeler_hidden, NUM_CLASSES])
    labeler.load_state_dict(state)
    return labeler.eval().requires_grad_(False)


def load_or_train_weak_labeler(cfg: DemoConfig, splits: DigitsSplits, cache_dir: Optional[str] = None, *,
                               use_cache: bool = True, log=print) -> Tuple[nn.Sequential, Dict[str, Any]]:
    """The second regime's labeler and its metrics (with ``cache_file`` and ``from_cache``), cached like the
    teacher under its own key: ``cache_dir/weak-teacher-<hash>.pt``."""
    cache_dir = default_cache_dir() if cache_dir is None else os.fspath(cache_dir)
    path = os.path.join(cache_dir, f"weak-teacher-{cfg.weak_teacher_hash()}.pt")
    state = _load_state(path, cfg.weak_teacher_key(), "weak teacher", log) if use_cache else None
    from_cache = state is not None
    if state is None:
        t0 = time.perf_counter()
        labeler = train_weak_labeler(splits, cfg)
        log(f"weak teacher: trained on {cfg.weak_teacher_labels} labels in {time.perf_counter() - t0:.1f} s")
        state = {"key": cfg.weak_teacher_key(), "labeler": labeler.state_dict()}
        if use_cache:
            _atomic_torch_save(state, path)
            log(f"weak teacher: cached at {path}")
    labeler = build_labeler(cfg, state["labeler"])
    info: Dict[str, Any] = {**weak_teacher_metrics(labeler, splits), "labels": cfg.weak_teacher_labels,
                            "cache_file": path if use_cache else None, "from_cache": from_cache,
                            "key": cfg.weak_teacher_hash()}
    return labeler, info
