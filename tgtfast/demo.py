"""``tgtfast demo``: Teacher Guided Training with few labels on scikit-learn's digits, end to end.

What it does (no download: the 8x8 digits ship with scikit-learn):

1. Splits the 1797 images (pixels scaled to ``[0, 1]``) once, stratified and seeded, into teacher-train (60 %),
   validation (15 %) and test (25 %).
2. Trains the teacher, or loads it from the cache: a labeler MLP ``64-128-128-10`` on the labelled teacher-train
   split, and a generator, a small VAE ``64-128-d-128-64`` (sigmoid output), on the teacher-train images without
   their labels. Both are plain ``nn.Sequential`` stacks of ``Linear`` layers and activations; the encoder returns
   the VAE mean.
3. Picks PTLoss coefficients with the Proxy Teacher (:func:`tgtfast.search_coefficients`) on the teacher's
   validation-split probabilities.
4. Trains compact students ``64-32-10`` from ``n`` labelled examples in total (default 20, 50 and 100; drawn
   stratified from teacher-train, a fresh draw per seed) by

   * ``onehot``: cross-entropy on the ``n`` labels only;
   * ``kd``: cross-entropy plus distillation from the labeler on the same ``n`` inputs;
   * ``tgt-random``: ``kd`` plus distillation on new inputs ``Dec(Enc(x) + sigma * noise)``;
   * ``tgt-gradient``: ``kd`` plus distillation on inputs found by gradient ascent of the student-teacher
     divergence in the VAE's latent space;

   the distillation loss being KL or PTLoss, over several seeds, through :class:`tgtfast.TGTTrainer`.
5. Prints a table of test accuracy (mean and standard deviation over seeds, teacher accuracy beside it) and writes
   ``results.json`` and ``results.png`` to ``--out``.

Every hyper-parameter is fixed in :class:`DemoConfig` before any student is trained (the values were checked on
the validation split only); the test split is used for the reported numbers and nothing else.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = [
    "DemoConfig",
    "DigitsSplits",
    "load_digits_splits",
    "TeacherVAE",
    "Teacher",
    "load_or_train_teacher",
    "few_label_subset",
    "train_student",
    "run_demo",
    "format_table",
    "demo_main",
]

METHODS: Tuple[str, ...] = ("onehot", "kd", "tgt-random", "tgt-gradient")
LOSSES: Tuple[str, ...] = ("kl", "ptloss")
NUM_CLASSES = 10
NUM_PIXELS = 64
_CACHE_FORMAT = 1


# ---------------------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class DemoConfig:
    """Everything that decides the demo's numbers.

    The teacher fields (``split_seed`` ... ``teacher_batch_size``) form the cache key of the teacher checkpoint;
    the others only affect the students.

    The student settings were fixed before the reported runs and checked on the validation split only (one-hot
    vs TGT at 20 and 100 labels, two seeds): ``sigma`` in {0.5, 1, 1.5} (1 and 1.5 tied; 1 is the VAE prior's
    scale), 8 vs 16 new samples per labelled example at ``n = 20`` (no gain from 16), gradient exploration with
    (``sigma``, ``grad_steps``, ``grad_step_size``) in {(1, 2, 0.5), (0.5, 2, 0.5), (1, 1, 1)} (the first best),
    and 200 vs 300 steps (300 about one point better on validation for 1.6x the time; 200 keeps the full demo
    within its time budget). ``new_samples_per_step`` keeps the cost of a TGT step the same for every budget.
    The teacher's training length was cut the same way (VAE 150 epochs of 128 images instead of 200 of 64: a
    third of the time, TGT at 20 labels within a point on validation).
    """

    # data split and teacher
    split_seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.25
    labeler_hidden: Tuple[int, ...] = (128, 128)
    labeler_epochs: int = 60
    labeler_lr: float = 1e-3
    labeler_weight_decay: float = 1e-4
    vae_hidden: int = 128
    vae_latent: int = 10
    vae_epochs: int = 150
    vae_lr: float = 3e-3
    teacher_batch_size: int = 128
    # students
    budgets: Tuple[int, ...] = (20, 50, 100)
    seeds: Tuple[int, ...] = (0, 1, 2)
    methods: Tuple[str, ...] = METHODS
    losses: Tuple[str, ...] = LOSSES
    student_hidden: int = 32
    steps: int = 200
    lr: float = 1e-2
    weight_decay: float = 0.0
    w_ce: float = 1.0
    w_kd: float = 1.0
    w_tgt: float = 1.0
    temperature: float = 1.0
    new_samples_per_step: int = 160  # TGT: about this many x' per step, ceil(160 / n) per labelled example
    sigma: float = 1.0
    grad_steps: int = 2
    grad_step_size: float = 0.5
    # PTLoss coefficients (Proxy Teacher search on the validation split)
    pt_order: int = 5
    pt_candidates: int = 100
    pt_seed: int = 0

    def teacher_key(self) -> Dict[str, Any]:
        names = ("split_seed", "val_fraction", "test_fraction", "labeler_hidden", "labeler_epochs", "labeler_lr",
                 "labeler_weight_decay", "vae_hidden", "vae_latent", "vae_epochs", "vae_lr", "teacher_batch_size")
        key = {n: getattr(self, n) for n in names}
        key["labeler_hidden"] = list(self.labeler_hidden)
        key["format"] = _CACHE_FORMAT
        return key

    def teacher_hash(self) -> str:
        blob = json.dumps(self.teacher_key(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def validate(self) -> "DemoConfig":
        for name in ("budgets", "seeds"):
            vals = getattr(self, name)
            if not vals:
                raise ValueError(f"{name} must not be empty")
            if any(isinstance(v, bool) or not isinstance(v, int) for v in vals):
                raise TypeError(f"{name} must be integers, got {vals!r}")
        if any(b < NUM_CLASSES for b in self.budgets):
            raise ValueError(f"budgets must be >= {NUM_CLASSES} (at least one labelled example per class), "
                             f"got {self.budgets!r}")
        if any(s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be >= 0, got {self.seeds!r}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {self.methods!r}")
        bad = [x for x in self.losses if x not in LOSSES]
        if bad or not self.losses:
            raise ValueError(f"losses must be a non-empty subset of {LOSSES}, got {self.losses!r}")
        for name in ("steps", "new_samples_per_step", "student_hidden", "labeler_epochs", "vae_epochs",
                     "vae_latent", "pt_order", "pt_candidates"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("lr", "sigma", "temperature", "grad_step_size"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive finite number, got {v!r}")
        return self

    @classmethod
    def quick(cls, **overrides: Any) -> "DemoConfig":
        """The ``--quick`` preset: one budget, two seeds, fewer steps; same teacher (cache shared)."""
        base = dict(budgets=(20,), seeds=(0, 1), steps=100)
        base.update(overrides)
        return cls(**base)


# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class DigitsSplits:
    """The fixed splits: ``x_*`` float32 ``[N, 64]`` in ``[0, 1]``, ``y_*`` int64 ``[N]``."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def sizes(self) -> Dict[str, int]:
        return {"teacher_train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}


def load_digits_splits(seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.25) -> DigitsSplits:
    """scikit-learn's digits, pixels ``/ 16``, split stratified into teacher-train / validation / test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction and test_fraction must be in (0, 1) with a sum below 1, got "
                         f"{val_fraction} and {test_fraction}")
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    idx = list(range(len(y)))
    rest, test = train_test_split(idx, test_size=test_fraction, stratify=y.numpy(), random_state=seed)
    train, val = train_test_split(rest, test_size=val_fraction / (1 - test_fraction), stratify=y[rest].numpy(),
                                  random_state=seed)
    tr, va, te = (torch.tensor(sorted(s)) for s in (train, val, test))
    return DigitsSplits(x[tr], y[tr], x[va], y[va], x[te], y[te])


def few_label_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices of ``n`` examples drawn stratified from ``labels``: ``n // K`` per class, the remainder spread over
    randomly chosen classes (at most one extra each). Deterministic in ``seed``."""
    k = int(labels.max()) + 1
    if n < k:
        raise ValueError(f"n must be at least the number of classes ({k}), got {n}")
    if n > len(labels):
        raise ValueError(f"n must be at most the number of examples ({len(labels)}), got {n}")
    g = torch.Generator().manual_seed(10_007 * seed + n)
    per_class = torch.full((k,), n // k, dtype=torch.int64)
    per_class[torch.randperm(k, generator=g)[: n % k]] += 1
    picked = []
    for c in range(k):
        pool = (labels == c).nonzero().flatten()
        if len(pool) < per_class[c]:
            raise ValueError(f"class {c} has only {len(pool)} examples, {int(per_class[c])} asked")
        picked.append(pool[torch.randperm(len(pool), generator=g)[: per_class[c]]])
    return torch.cat(picked).sort().values


# ---------------------------------------------------------------------------------------------------------------
# teacher: labeler MLP and VAE generator
# ---------------------------------------------------------------------------------------------------------------


def mlp(sizes: Sequence[int], out_activation: Optional[nn.Module] = None) -> nn.Sequential:
    """``Linear -> ReLU -> ... -> Linear`` (plus ``out_activation``) as a flat ``nn.Sequential``."""
    layers: List[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    if out_activation is not None:
        layers.append(out_activation)
    return nn.Sequential(*layers)


class TeacherVAE(nn.Module):
    """A small VAE on 64-pixel images in ``[0, 1]``.

    ``encoder`` (``64 -> hidden -> latent``) gives the posterior mean, ``decoder`` (``latent -> hidden -> 64``,
    sigmoid) the image; both are flat ``nn.Sequential`` MLPs. ``logvar`` reads the encoder's hidden layer.
    """

    def __init__(self, hidden: int = 128, latent: int = 10) -> None:
        super().__init__()
        self.encoder = mlp([NUM_PIXELS, hidden, latent])
        self.logvar = nn.Linear(hidden, latent)
        self.decoder = mlp([latent, hidden, NUM_PIXELS], nn.Sigmoid())

    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder[1](self.encoder[0](x))
        return self.encoder[2](h), self.logvar(h)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decoder(z), mu, logvar

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Negative ELBO per image (Bernoulli likelihood on pixel intensities)."""
        recon, mu, logvar = self(x)
        rec = nn.functional.binary_cross_entropy(recon, x, reduction="sum")
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        return (rec + kl) / x.shape[0]


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


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(-1) == y).float().mean())


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
    return {
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
    for the same teacher settings, else trained and saved there (atomically: temporary file, then rename)."""
    cache_dir = default_cache_dir() if cache_dir is None else os.fspath(cache_dir)
    path = os.path.join(cache_dir, f"teacher-{cfg.teacher_hash()}.pt")
    if use_cache and os.path.exists(path):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if state.get("key") == json.loads(json.dumps(cfg.teacher_key())):
                labeler, vae = _build_teacher(cfg, state)
                log(f"teacher: loaded from cache {path}")
                return Teacher(labeler, vae, teacher_metrics(labeler, vae, splits), path, True)
            log(f"teacher: cache file {path} was written for other settings; retraining")
        except Exception as exc:  # a damaged or foreign file in the cache is replaced, whatever the reason
            log(f"teacher: cache file {path} unreadable ({type(exc).__name__}); retraining")
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


# ---------------------------------------------------------------------------------------------------------------
# students
# ---------------------------------------------------------------------------------------------------------------


def _distill_loss(name: str, coeffs: Optional[torch.Tensor], temperature: float) -> nn.Module:
    import tgtfast

    if name == "kl":
        return tgtfast.KDLoss(temperature=temperature)
    return tgtfast.PTLoss(coeffs, temperature=temperature)


def train_student(method: str, loss: str, x: torch.Tensor, y: torch.Tensor, teacher: Teacher, cfg: DemoConfig,
                  seed: int, coeffs: Optional[torch.Tensor] = None) -> nn.Sequential:
    """One student ``64-hidden-10`` trained on the labelled ``(x, y)`` by ``method`` with distillation loss
    ``loss`` (``"kl"`` or ``"ptloss"`` with ``coeffs``), through :class:`tgtfast.TGTTrainer`."""
    import tgtfast

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if loss not in LOSSES and not (method == "onehot" and loss == "-"):
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if loss == "ptloss" and coeffs is None:
        raise ValueError("loss='ptloss' needs coeffs (e.g. from tgtfast.search_coefficients)")
    torch.manual_seed(seed)
    student = mlp([NUM_PIXELS, cfg.student_hidden, NUM_CLASSES])
    if method == "onehot":
        weights = dict(w_ce=cfg.w_ce, w_kd=0.0, w_tgt=0.0)
        exploration = "none"
    else:
        weights = dict(w_ce=cfg.w_ce, w_kd=cfg.w_kd, w_tgt=cfg.w_tgt if method.startswith("tgt") else 0.0)
        exploration = {"kd": "none", "tgt-random": "random", "tgt-gradient": "gradient"}[method]
    config = tgtfast.TGTConfig(
        exploration=exploration, **weights, sigma=cfg.sigma,
        samples_per_example=max(1, math.ceil(cfg.new_samples_per_step / len(y))),
        explore_steps=cfg.grad_steps, explore_step_size=cfg.grad_step_size, max_steps=cfg.steps,
        batch_size=len(y), optimizer="adam", lr=cfg.lr, weight_decay=cfg.weight_decay, seed=seed, device="cpu",
        out_dir=None, progress=False, plot=False,
    )
    trainer = tgtfast.TGTTrainer(student, teacher.labeler, teacher.vae.decoder, teacher.vae.encoder,
                                 loss=_distill_loss(loss, coeffs, cfg.temperature), config=config)
    trainer.fit((x, y))
    return student.eval()


# The worker processes receive the teacher and the data once (pool initializer), then one job per student.
_WORKER: Dict[str, Any] = {}


def _worker_init(cfg: DemoConfig, splits: DigitsSplits, state: Dict[str, Any], metrics: Dict[str, float],
                 coeffs: Optional[torch.Tensor], threads: int) -> None:
    torch.set_num_threads(threads)
    labeler, vae = _build_teacher(cfg, state)
    _WORKER.update(cfg=cfg, splits=splits, teacher=Teacher(labeler, vae, metrics), coeffs=coeffs)


def _run_job(job: Tuple[str, str, int, int]) -> Dict[str, Any]:
    method, loss, budget, seed = job
    cfg: DemoConfig = _WORKER["cfg"]
    splits: DigitsSplits = _WORKER["splits"]
    t0 = time.perf_counter()
    idx = few_label_subset(splits.y_train, budget, seed)
    # the same labelled subset and the same initial student for every method at a given (budget, seed)
    student = train_student(method, loss, splits.x_train[idx], splits.y_train[idx], _WORKER["teacher"], cfg,
                            seed=1000 * seed + budget, coeffs=_WORKER["coeffs"] if loss == "ptloss" else None)
    return {
        "method": method, "loss": loss, "budget": budget, "seed": seed,
        "val_accuracy": accuracy(student, splits.x_val, splits.y_val),
        "test_accuracy": accuracy(student, splits.x_test, splits.y_test),
        "seconds": time.perf_counter() - t0,
    }


def rows(cfg: DemoConfig) -> List[Tuple[str, str]]:
    """The table's rows: ``("onehot", "-")`` and every other method with every loss."""
    out: List[Tuple[str, str]] = []
    for m in cfg.methods:
        if m == "onehot":
            out.append((m, "-"))
        else:
            out.extend((m, lo) for lo in cfg.losses)
    return out


def _jobs(cfg: DemoConfig) -> List[Tuple[str, str, int, int]]:
    # the slow TGT runs first, so that the parallel workers finish together
    cost = {"tgt-gradient": 0, "tgt-random": 1, "kd": 2, "onehot": 3}
    jobs = [(m, lo, b, s) for (m, lo) in rows(cfg) for b in cfg.budgets for s in cfg.seeds]
    return sorted(jobs, key=lambda j: (cost[j[0]], -j[2]))


def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def summarise(runs: Sequence[Dict[str, Any]], cfg: DemoConfig) -> List[Dict[str, Any]]:
    out = []
    for method, loss in rows(cfg):
        for b in cfg.budgets:
            accs = [r["test_accuracy"] for r in runs if (r["method"], r["loss"], r["budget"]) == (method, loss, b)]
            vals = [r["val_accuracy"] for r in runs if (r["method"], r["loss"], r["budget"]) == (method, loss, b)]
            if not accs:
                continue
            mean, std = _mean_std(accs)
            vmean, _ = _mean_std(vals)
            out.append({"method": method, "loss": loss, "budget": b, "test_mean": mean, "test_std": std,
                        "val_mean": vmean, "seeds": len(accs)})
    return out


def format_table(summary: Sequence[Dict[str, Any]], cfg: DemoConfig, teacher_metrics: Dict[str, float],
                 test_size: int, train_size: int) -> str:
    """The printed table: rows method x loss, columns label budgets, test accuracy in percent (mean ± std)."""
    lines = [
        f"Test accuracy (%) of {NUM_PIXELS}-{cfg.student_hidden}-{NUM_CLASSES} students on {test_size} test images, "
        f"mean ± std over {len(cfg.seeds)} seed{'s' if len(cfg.seeds) != 1 else ''}",
        f"Teacher labeler {NUM_PIXELS}-{'-'.join(map(str, cfg.labeler_hidden))}-{NUM_CLASSES} trained on "
        f"{train_size} labels: {100 * teacher_metrics['labeler_test_accuracy']:.1f}",
        "",
    ]
    header = f"{'method':<14}{'loss':<8}" + "".join(f"{f'n={b}':>14}" for b in cfg.budgets) + f"{'teacher':>10}"
    lines += [header, "-" * len(header)]
    by_key = {(s["method"], s["loss"], s["budget"]): s for s in summary}
    for method, loss in rows(cfg):
        cells = []
        for b in cfg.budgets:
            s = by_key.get((method, loss, b))
            cells.append(f"{100 * s['test_mean']:6.1f} ± {100 * s['test_std']:4.1f}" if s else f"{'-':>13}")
        lines.append(f"{method:<14}{loss:<8}" + "".join(f"{c:>14}" for c in cells)
                     + f"{100 * teacher_metrics['labeler_test_accuracy']:>10.1f}")
    return "\n".join(lines)


def plot_results(summary: Sequence[Dict[str, Any]], cfg: DemoConfig, teacher_acc: float, path: str) -> None:
    """Test accuracy against the label budget, one line per method and loss, teacher as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    colors = {"onehot": "tab:gray", "kd": "tab:blue", "tgt-random": "tab:orange", "tgt-gradient": "tab:green"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, loss in rows(cfg):
        pts = sorted((s["budget"], s["test_mean"], s["test_std"]) for s in summary
                     if s["method"] == method and s["loss"] == loss)
        if not pts:
            continue
        b, m, e = zip(*pts)
        ax.errorbar(b, [100 * v for v in m], yerr=[100 * v for v in e], color=colors[method], capsize=3,
                    linestyle="--" if loss == "ptloss" else "-", marker="o" if loss != "ptloss" else "s",
                    label=method if loss == "-" else f"{method} ({loss})")
    ax.axhline(100 * teacher_acc, color="black", linestyle=":", label="teacher")
    ax.set_xscale("log")
    ax.set_xticks(list(cfg.budgets))
    ax.set_xticklabels([str(b) for b in cfg.budgets])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("labelled examples seen by the student")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Digits: students with few labels ({len(cfg.seeds)} seeds, mean ± std)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _atomic_write_text(path: str, text: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def run_demo(cfg: DemoConfig, out_dir: str = "tgtfast-demo", *, cache_dir: Optional[str] = None,
             use_cache: bool = True, jobs: Optional[int] = None, threads: int = 1, progress: bool = True,
             log=print) -> Dict[str, Any]:
    """Run the whole demo (see the module docstring); returns what ``results.json`` holds."""
    cfg.validate()
    if jobs is None:
        jobs = max(1, min(2, os.cpu_count() or 1))
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run_demo(cfg, out_dir, cache_dir, use_cache, jobs, threads, progress, log)
    finally:
        torch.set_num_threads(threads_before)


def _run_demo(cfg: DemoConfig, out_dir: str, cache_dir: Optional[str], use_cache: bool, jobs: int, threads: int,
              progress: bool, log) -> Dict[str, Any]:
    t_start = time.perf_counter()
    splits = load_digits_splits(cfg.split_seed, cfg.val_fraction, cfg.test_fraction)
    for b in cfg.budgets:  # a budget the teacher-train split cannot fill fails here, before any training
        try:
            few_label_subset(splits.y_train, b, 0)
        except ValueError as exc:
            raise ValueError(f"budgets: {b} labelled examples cannot be drawn from the {len(splits.y_train)} "
                             f"teacher-train images ({exc})") from None
    os.makedirs(out_dir, exist_ok=True)
    teacher = load_or_train_teacher(cfg, splits, cache_dir, use_cache=use_cache, log=log)
    t_teacher = time.perf_counter() - t_start
    log(f"teacher: labeler test accuracy {100 * teacher.metrics['labeler_test_accuracy']:.1f} %, "
        f"validation {100 * teacher.metrics['labeler_val_accuracy']:.1f} %")

    import tgtfast

    coeffs = None
    proxy: Dict[str, Any] = {}
    if "ptloss" in cfg.losses and any(m != "onehot" for m in cfg.methods):
        with torch.no_grad():
            p_val = torch.softmax(teacher.labeler(splits.x_val) / cfg.temperature, -1)
        res = tgtfast.search_coefficients(p_val, splits.y_val, order=cfg.pt_order, num_candidates=cfg.pt_candidates,
                                          seed=cfg.pt_seed, temperature=cfg.temperature)
        coeffs = res.coeffs.detach().float().cpu()
        proxy = {"coeffs": coeffs.tolist(), "deviation": float(res.deviation), "kl_deviation": float(res.kl_deviation)}
        log(f"PTLoss coefficients from the Proxy Teacher on the validation split: deviation {res.deviation:.3g} "
            f"(plain KL {res.kl_deviation:.3g})")

    state = {"labeler": teacher.labeler.state_dict(), "vae": teacher.vae.state_dict()}
    todo = _jobs(cfg)
    runs: List[Dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="students", unit="run", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        if jobs == 1:
            saved = dict(_WORKER)
            _worker_init(cfg, splits, state, teacher.metrics, coeffs, threads)
            try:
                for job in todo:
                    runs.append(_run_job(job))
                    if bar is not None:
                        bar.update(1)
            finally:
                _WORKER.clear()
                _WORKER.update(saved)
        else:
            import multiprocessing as mp

            with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                     initargs=(cfg, splits, state, teacher.metrics, coeffs, threads)) as pool:
                futures = [pool.submit(_run_job, job) for job in todo]
                for fut in as_completed(futures):
                    runs.append(fut.result())
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    t_students = time.perf_counter() - t0
    runs.sort(key=lambda r: (rows(cfg).index((r["method"], r["loss"])), r["budget"], r["seed"]))
    summary = summarise(runs, cfg)
    table = format_table(summary, cfg, teacher.metrics, len(splits.y_test), len(splits.y_train))
    result = {
        "config": dataclasses.asdict(cfg),
        "splits": splits.sizes(),
        "teacher": {**teacher.metrics, "cache_file": teacher.cache_path, "from_cache": teacher.from_cache,
                    "key": cfg.teacher_hash()},
        "proxy_teacher": proxy,
        "summary": summary,
        "runs": runs,
        "table": table,
        "seconds": {"teacher": t_teacher, "students": t_students, "total": time.perf_counter() - t_start},
        "jobs": jobs,
        "threads_per_job": threads,
        "versions": {"tgtfast": tgtfast.__version__, "torch": torch.__version__},
    }
    json_path = os.path.join(out_dir, "results.json")
    png_path = os.path.join(out_dir, "results.png")
    plot_results(summary, cfg, teacher.metrics["labeler_test_accuracy"], png_path)
    result["seconds"]["total"] = time.perf_counter() - t_start
    _atomic_write_text(json_path, json.dumps(result, indent=2) + "\n")
    result["files"] = {"json": json_path, "png": png_path}
    return result


# ---------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------


def _int_at_least(low: int, what: str):
    """An argparse type: an integer >= `low` (`what` names the expectation in the error)."""

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return v

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def demo_main(argv: Optional[Sequence[str]] = None) -> int:
    """``tgtfast demo [--quick] [--seeds 0 1 2] [--budgets 20 50 100] [--out DIR] [--cache-dir DIR] ...``"""
    ap = argparse.ArgumentParser(
        prog="tgtfast demo",
        description="Teacher Guided Training with few labels on scikit-learn's digits: trains (or loads) the "
                    "teacher, trains students by one-hot training, distillation, TGT random and TGT gradient with "
                    "KL and PTLoss, prints a table and writes results.json and results.png.")
    ap.add_argument("--quick", action="store_true", help="small run: budget 20, 2 seeds, fewer steps")
    ap.add_argument("--seeds", type=_non_negative_int, nargs="+", help="student seeds (default 0 1 2)")
    ap.add_argument("--budgets", type=_positive_int, nargs="+",
                    help="labelled examples per student run, in total, stratified (default 20 50 100)")
    ap.add_argument("--methods", nargs="+", choices=METHODS, help=f"default: all of {' '.join(METHODS)}")
    ap.add_argument("--losses", nargs="+", choices=LOSSES, help="distillation losses (default kl ptloss)")
    ap.add_argument("--steps", type=_positive_int, help="optimiser steps per student")
    ap.add_argument("--out", default="tgtfast-demo", help="directory for results.json and results.png")
    ap.add_argument("--cache-dir", default=None,
                    help="teacher checkpoint cache (default ~/.cache/tgtfast/demo, or $XDG_CACHE_HOME/tgtfast/demo)")
    ap.add_argument("--no-cache", action="store_true", help="train the teacher afresh and do not save it")
    ap.add_argument("--jobs", type=_positive_int, default=None,
                    help="student runs in parallel processes (default: min(2, CPU count))")
    ap.add_argument("--threads", type=_positive_int, default=1, help="torch threads per process (default 1)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    overrides: Dict[str, Any] = {}
    for name in ("seeds", "budgets", "methods", "losses"):
        v = getattr(args, name)
        if v is not None:
            overrides[name] = tuple(dict.fromkeys(v))
    if args.steps is not None:
        overrides["steps"] = args.steps
    try:
        cfg = DemoConfig.quick(**overrides) if args.quick else DemoConfig(**overrides)
        cfg.validate()
        result = run_demo(cfg, args.out, cache_dir=args.cache_dir, use_cache=not args.no_cache, jobs=args.jobs,
                          threads=args.threads, progress=not args.no_progress)
    except (ValueError, TypeError, OSError) as exc:
        print(f"tgtfast demo: error: {exc}", file=sys.stderr)
        return 2
    print()
    print(result["table"])
    print()
    print(f"wrote {result['files']['json']} and {result['files']['png']} "
          f"({result['seconds']['total']:.0f} s: teacher {result['seconds']['teacher']:.0f} s, "
          f"students {result['seconds']['students']:.0f} s on {result['jobs']} process"
          f"{'es' if result['jobs'] > 1 else ''})")
    return 0
