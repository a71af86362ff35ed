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
    labeler = mlp([NUM_PIXELS, *cfg.labeler_hidden, NUM_CLASSES])
    labeler.load_state_dict(state["labeler"])
    vae = TeacherVAE(cfg.vae_hidden, cfg.vae_latent)
    vae.load_state_dict(state["vae"])
    for m in (labeler, vae):
        m.eval().requires_grad_(False)
    return labeler, vae


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
    if use_cache and os.path.exists(path):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and state.get("key") == json.loads(json.dumps(cfg.teacher_key())):
                labeler, vae = _build_teacher(cfg, state)
                log(f"teacher: loaded from cache {path}")
                return Teacher(labeler, vae, teacher_metrics(labeler, vae, splits), path, True)
            log(f"teacher: warning: cache file {path} was written for other settings; retraining and rewriting it")
        except Exception as exc:  # damaged, foreign or refused by the weights-only unpickler: replaced, never run
            log(f"teacher: warning: cache file {path} unreadable ({type(exc).__name__}); retraining and rewriting it")
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
