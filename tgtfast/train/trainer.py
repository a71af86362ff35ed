"""Teacher Guided Training (TGT paper Sec. 3.2; docs/design.md section 3): :class:`TGTTrainer`.

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
decoder and labeler are MLPs); the noise streams are described in :mod:`tgtfast.train.noise`.

This module orchestrates; the pieces live beside it: :mod:`~tgtfast.train.config`, :mod:`~tgtfast.train.data`,
:mod:`~tgtfast.train.preflight`, :mod:`~tgtfast.train.exploration`, :mod:`~tgtfast.train.checkpoint`,
:mod:`~tgtfast.train.records` and :mod:`~tgtfast.train.distributed`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import warnings
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as TF
from torch import nn

from tgtfast.train import checkpoint as ckpt
from tgtfast.train.config import TGTConfig
from tgtfast.train.data import Joined, StepSampler, TensorPairs, as_dataset, default_batch_fn, load_batch
from tgtfast.train.distributed import broadcast_object, resolve_device, setup_distributed
from tgtfast.train.evaluation import evaluate_student
from tgtfast.train import imperfect
from tgtfast.train.exploration import autocast, loss_option, new_samples
from tgtfast.train.noise import mix
from tgtfast.train.optim import make_optimizer, make_scheduler
from tgtfast.train.preflight import probe, scan_training_set
from tgtfast.train.records import TGTHistory, append_jsonl, plot_history, progress
from tgtfast.train.streams import make_plan
from tgtfast.train.teachers import check_batch_teacher, check_labeler, missing_teacher_error

__all__ = ["TGTTrainer"]


class TGTTrainer:
    """Train ``student`` by Teacher Guided Training (see the module docstring for the objective).

    Args (everything after ``student, labeler`` is keyword-only; passing more positional arguments, as the old
    ``TGTTrainer(student, labeler, decoder, encoder)`` did, is a ``TypeError`` saying so):
        student: the model trained; maps a batch of inputs ``x`` to logits ``[N, K]``.
        labeler: the frozen teacher labeler ``h``: inputs to logits ``[N, K]``. May be None when ``batch_fn``
            returns the cached teacher of every batch and nothing else needs the labeler (``exploration="none"``).
        decoder: the frozen teacher decoder ``Dec: [N, d] -> inputs`` (needed by ``exploration="random"`` and
            ``"gradient"``; ``"none"`` and ``"input"`` use no generator).
        encoder: the frozen teacher encoder ``Enc: inputs -> [N, d]`` (needed by the same two).
        loss: the distillation loss ``l_d(student_logits, teacher_logits)``: any loss of the package
            (:class:`tgtfast.KDLoss`, :class:`tgtfast.PTLoss` e.g. with coefficients from
            :func:`tgtfast.search_coefficients`, ...) or a callable returning the mean over rows. Its
            ``temperature`` attribute (if any) is the temperature of the teacher's soft labels. Default
            ``tgtfast.KDLoss()``.
        config: a :class:`TGTConfig`.
        batch_fn: maps a collated batch to ``(inputs, labels)``; labels may be ``None`` (unlabelled) and
            label ``-100`` marks an unlabelled example. Default: batches ``(x, y)`` or ``(x,)``. It may return
            ``(inputs, labels, teacher)`` with the batch's cached teacher (an offline teacher): dense logits
            ``[N, K]`` or a :class:`tgtfast.SparseTeacher` ``[N, k]`` (e.g. from a :class:`tgtfast.TeacherCache`),
            which then replaces ``labeler(inputs)`` in the distillation term of the training inputs and in
            ``val_kd`` (the labeler still labels new samples). A SparseTeacher needs a loss that takes one
            (:class:`tgtfast.DistillLoss`; ``KDLoss`` / ``PTLoss`` are refused by name) and no ``imperfect``.
        optimizer: optional ``params -> torch.optim.Optimizer`` factory replacing ``config.optimizer``.
        reliability: a fitted :class:`tgtfast.imperfect.TeacherReliability` for ``config.imperfect`` and
            ``config.active_pool`` (default: fitted on the labelled rows of ``fit``'s ``val``; see
            :mod:`tgtfast.train.imperfect`).

    The teacher modules are put in eval mode and their parameters stop requiring gradients. During gradient
    exploration the student runs in eval mode (no dropout, no batch-norm statistics updates).
    """

    def __init__(
        self,
        student: nn.Module,
        labeler: Callable[[torch.Tensor], torch.Tensor],
        *positional: Any,
        decoder: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        encoder: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        loss: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
        config: Optional[TGTConfig] = None,
        batch_fn: Optional[Callable[[Any], Tuple[torch.Tensor, Optional[torch.Tensor]]]] = None,
        optimizer: Optional[Callable[[Any], torch.optim.Optimizer]] = None,
        reliability: Any = None,
    ) -> None:
        import tgtfast

        if positional:
            raise TypeError(
                f"TGTTrainer takes two positional arguments (student, labeler); the other {len(positional)} must be "
                "passed by name: TGTTrainer(student, labeler, decoder=..., encoder=..., loss=..., config=...) "
                "(decoder and encoder are easy to swap by position, so they are keyword-only)")
        config = TGTConfig() if config is None else config
        if not isinstance(config, TGTConfig):
            raise TypeError(f"config must be a tgtfast.TGTConfig, got {type(config).__name__}")
        if not isinstance(student, nn.Module):
            raise TypeError(f"student must be a torch.nn.Module, got {type(student).__name__}")
        for name, mod in (("labeler", labeler), ("decoder", decoder), ("encoder", encoder)):
            if mod is not None and not callable(mod):
                raise TypeError(f"{name} must be a module or callable, got {type(mod).__name__}")
        check_labeler(labeler, config, reliability)
        if config.exploration in ("random", "gradient"):
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
        self.batch_fn = batch_fn or default_batch_fn
        self._optimizer_factory = optimizer
        self.temperature = float(loss_option(self.loss, "temperature", 1.0))
        imperfect.check_options(config, self.loss)
        self.reliability = reliability
        self._term = imperfect.distill_term("none", self.loss, None, self.temperature)
        self._correctness: Optional[imperfect.ActiveCorrectness] = None
        self._batch_teacher = False
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None
        self.history = TGTHistory()
        self.step = 0
        self.rank, self.world_size = 0, 1

    # ----------------------------------------------------------------------------------------------- set-up

    def fingerprint(self) -> str:
        """A hash of everything that decides the trained weights: the config fields that matter, the loss and
        the student's parameter names and shapes. A checkpoint resumes only a run with the same fingerprint."""
        return ckpt.fingerprint(self.config, self.loss, self.student)

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

    def _load_batch(self, dataset, collate, indices, device: torch.device, batch: Any = None, **teacher: bool):
        return load_batch(dataset, collate, self.batch_fn, indices, device, batch, **teacher)

    # ----------------------------------------------------------------------------------------------- the step

    def _train_step(self, step: int, batches, data, device: torch.device, model: nn.Module) -> Dict[str, float]:
        """One optimiser step over this rank's micro-batches; returns the step's global metrics."""
        import torch.distributed as dist

        c = self.config
        dataset, collate, cache_z, cache_t, fetch = data
        loaded = []
        for micro, idx, start, _ in batches:
            batch = None if fetch is None else fetch()
            if self._batch_teacher:
                x, y, tb = self._load_batch(dataset, collate, idx, device, batch, teacher=True)
                if tb is None:
                    raise missing_teacher_error(step)
            else:
                (x, y), tb = self._load_batch(dataset, collate, idx, device, batch), None
            loaded.append((micro, idx, start, x, y, tb))
        # Normalisers: global counts over all accumulated micro-batches and ranks.
        n_all = sum(size for *_, size in batches)
        n_lab_local = sum(int((y != -100).sum()) if y is not None else 0 for *_, y, _ in loaded)
        counts = torch.tensor([float(n_lab_local)], dtype=torch.float64)
        distributed = self.world_size > 1
        if distributed:
            counts = counts.to(device)
            dist.all_reduce(counts)
        n_lab = float(counts[0])
        S = c.samples_per_example
        exploring = c.exploration != "none"
        latent = c.exploration in ("random", "gradient")
        sums = torch.zeros(6, dtype=torch.float64, device=device)  # ce, kd, tgt, correct, examples, queries
        if c.active_pool > 1 and exploring and c.w_tgt > 0:
            self._correctness.refit_if_due(self.student, step, c.active_refit_every)
        for j, (micro, idx, start, x, y, tb) in enumerate(loaded):
            queries = 0
            ii = torch.as_tensor(idx, dtype=torch.long, device=device)
            with torch.no_grad():
                if tb is not None:  # the batch's cached teacher
                    t = tb
                elif cache_t is not None:
                    t = cache_t[ii]
                else:
                    t = self.labeler(x).float()
                    queries += x.shape[0]
                z0 = (cache_z[ii] if cache_z is not None else self.encoder(x)) if latent else None
            nx = x.shape[0]
            if exploring and c.w_tgt > 0:
                x_new, t_new, asked = new_samples(z0 if latent else x, nx, config=c, explore_config=self._explore_config,
                                                  step=step, micro=micro, start=start, student=self.student,
                                                  decoder=self.decoder, labeler=self.labeler, loss=self.loss,
                                                  temperature=self.temperature, correctness=self._correctness)
                queries += asked
                inputs = torch.cat([x, x_new.to(x.dtype)])
            else:
                inputs, t_new = x, None
            last = j == len(loaded) - 1
            sync = model.no_sync() if (distributed and not last and hasattr(model, "no_sync")) else contextlib.nullcontext()
            with sync:
                with autocast(c.bf16, device):
                    logits = model(inputs)
                logits = logits.float()
                s, s_new = logits[:nx], logits[nx:]
                if y is not None and n_lab > 0:
                    ce = TF.cross_entropy(s, y, ignore_index=-100, reduction="sum")
                else:
                    ce = s.sum() * 0.0
                kd = self._term(s, t) if c.w_kd > 0 else s.sum() * 0.0
                tgt = self._term(s_new, t_new) if t_new is not None else s.sum() * 0.0
                total = c.w_ce * ce / max(n_lab, 1.0) + c.w_kd * kd / n_all + c.w_tgt * tgt / (n_all * S)
                # DDP averages the ranks' gradients; the global normalisers already account for every rank.
                (total * self.world_size).backward()
            with torch.no_grad():
                correct = (s.argmax(1) == y).sum() if y is not None else torch.zeros((), device=device)
                sums += torch.stack([ce.detach().double(), kd.detach().double(), tgt.detach().double(),
                                     correct.double(), torch.tensor(float(nx), dtype=torch.float64, device=device),
                                     torch.tensor(float(queries), dtype=torch.float64, device=device)])
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
        tgt_m = float(sums[2]) / (n_all * S) if exploring and c.w_tgt > 0 else 0.0
        return {
            "loss": c.w_ce * ce_m + c.w_kd * kd_m + c.w_tgt * tgt_m,
            "ce": ce_m, "kd": kd_m, "tgt": tgt_m,
            "acc": float(sums[3]) / n_lab if n_lab > 0 else float("nan"),
            "lr": lr, "examples": n_all, "samples": n_all * (1 + (S if exploring and c.w_tgt > 0 else 0)),
            "teacher_queries": int(round(float(sums[5]))),
        }

    # ----------------------------------------------------------------------------------------------- evaluation

    def evaluate(self, data: Any) -> Dict[str, float]:
        """Metrics of the student on ``data``: on its labelled examples accuracy ``val_acc``, negative
        log-likelihood ``val_nll`` (natural log, at temperature 1; ``val_ce`` is the same number under its older
        name) and expected calibration error ``val_ece`` (``config.ece_bins`` equal-width confidence bins, see
        :mod:`tgtfast.metrics`); on all of them the distillation loss to the labeler, ``val_kd``."""
        return evaluate_student(self.student, self.labeler, self.loss, self.config, self.batch_fn, data)

    # ----------------------------------------------------------------------------------------------- checkpoints

    def _ckpt_path(self) -> Optional[str]:
        return None if self.config.out_dir is None else os.path.join(self.config.out_dir, ckpt.CHECKPOINT_NAME)

    def _device(self) -> torch.device:
        return next(self.student.parameters()).device

    def _save_checkpoint(self) -> None:
        """Write the checkpoint (rank 0); every rank must call it (the ranks' generator states are gathered)."""
        path = self._ckpt_path()
        if path is None:
            return
        rngs = [ckpt.rng_state(self._device())]
        if self.world_size > 1:
            import torch.distributed as dist

            rngs = [None] * self.world_size
            dist.all_gather_object(rngs, ckpt.rng_state(self._device()))
        if self.rank != 0:
            return
        ckpt.save_checkpoint(path, {
            "fingerprint": self.fingerprint(),
            "step": self.step,
            "student": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rngs,  # per rank: dropout draws continue where they stopped
            "history": self.history.to_dict(),
            "config": self.config.to_dict(),
            "active_correctness": None if self._correctness is None else self._correctness.state(),
        })

    def _read_checkpoint(self, total: int) -> Optional[Dict[str, Any]]:
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
        return ckpt.load_checkpoint(path, expected_fingerprint=self.fingerprint(), config=self.config,
                                    total_steps=total)

    def _restore(self, state: Dict[str, Any]) -> None:
        try:
            self.student.load_state_dict(state["student"])
        except RuntimeError as exc:
            raise ValueError(f"the checkpoint's student weights do not fit this student: {exc}") from exc
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise ValueError(f"the checkpoint's optimizer state does not fit this run: {exc}") from exc
        self.step = int(state["step"])
        self.history = TGTHistory(**state["history"])
        if self._correctness is not None:
            self._correctness.load(state.get("active_correctness"))
        if len(state["rng"]) == self.world_size:
            ckpt.set_rng_state(state["rng"][self.rank], self._device())
        elif self.rank == 0:
            warnings.warn(f"the checkpoint was written by {len(state['rng'])} processes, this run has "
                          f"{self.world_size}: random draws of the student (dropout) restart from the seed")

    # ----------------------------------------------------------------------------------------------- fit

    def fit(self, train: Any, val: Any = None, *, unlabelled: Any = None,
            callback: Optional[Callable[["TGTTrainer", Dict[str, float]], None]] = None) -> TGTHistory:
        """Train the student on ``train`` (evaluating on ``val`` if given) and return the :class:`TGTHistory`.

        ``train``/``val``: a map-style dataset, a DataLoader over one (its dataset and collate function are
        used; the trainer does its own sampling), or a tuple of tensors ``(x, y)``. ``unlabelled``: optionally a
        second stream of the same kinds whose examples are used without labels (any labels it has are ignored):
        then every global micro-batch holds ``config.labelled_per_batch`` labelled examples of ``train`` (by
        default the pools' proportion, at least one) and unlabelled ones for the rest (see
        :mod:`tgtfast.train.streams`; its batches are loaded in the main process whatever ``num_workers``).
        ``config.labelled_per_batch`` does the same for a single ``train`` whose unlabelled examples carry
        label -100. ``callback(trainer, record)`` is called on every process after every optimiser step with that
        step's metrics.
        Under ``torchrun`` (``WORLD_SIZE > 1``) the student is wrapped in DistributedDataParallel, each rank
        takes its contiguous share of every global micro-batch, and only rank 0 writes files.

        Every label of ``train`` is checked before the first step (a bad one is a ``ValueError`` naming the
        example), as are the models' shapes and, on resume, the checkpoint.
        """
        import torch.distributed as dist

        dataset, collate = as_dataset(train, "train")
        if len(dataset) == 0:
            raise ValueError("train is empty: the training set has no examples")
        if unlabelled is not None:
            uds, ucollate = as_dataset(unlabelled, "unlabelled")
            if len(uds) == 0:
                raise ValueError("unlabelled is empty: pass unlabelled=None or a non-empty dataset")
            dataset, collate = Joined(dataset, collate, uds, ucollate), None
        n = len(dataset)
        if val is not None:
            vds, _ = as_dataset(val, "val")
            if len(vds) == 0:
                raise ValueError("val is empty: pass val=None or a non-empty validation set")
        device = resolve_device(self.config.device)
        created_pg, self.rank, self.world_size = setup_distributed(self.config.distributed_backend, device)
        try:
            return self._fit(dataset, collate, n, val, device, callback)
        finally:
            if created_pg and dist.is_initialized():
                dist.destroy_process_group()

    def _fit(self, dataset, collate, n, val, device, callback) -> TGTHistory:
        import torch.distributed as dist

        c = self.config
        self._to_device(device)
        self._freeze_teacher()
        x0, y0, t0 = self._load_batch(dataset, collate, list(range(min(2, n))), device, teacher=True)
        check_batch_teacher(t0, self.labeler, self.loss, c)
        self._batch_teacher = t0 is not None
        widths = probe(self.student, self.labeler, self.encoder, self.decoder, c.exploration, x0, y0, t0)
        progress_on = (self.rank == 0) and (c.progress if c.progress is not None else sys.stderr.isatty())
        # One pass over the training set: every label checked, the labelled ones marked, the teacher cached
        # (before anything is written).
        cache_z, cache_t, labelled = scan_training_set(
            dataset, collate, self.batch_fn, device, labeler=self.labeler, encoder=self.encoder, widths=widths,
            explore=c.exploration in ("random", "gradient"), cache=c.cache_teacher, check_labels=y0 is not None,
            label=not self._batch_teacher,
            batch_size=c.batch_size, rank=self.rank, world_size=self.world_size, show_progress=progress_on)
        plan = make_plan(c, n, labelled, isinstance(dataset, Joined), self.rank, self.world_size)
        self.reliability = imperfect.resolve(c, self.reliability, self.labeler, val, self.batch_fn, device,
                                             self.temperature)
        self._term = imperfect.distill_term(c.imperfect, self.loss, self.reliability, self.temperature)
        self._correctness = None
        if c.active_pool > 1:
            self._correctness = imperfect.ActiveCorrectness.build(self.labeler, val, self.batch_fn, device,
                                                                  bins=c.reliability_bins,
                                                                  reliability=self.reliability)
        self._explore_config = c.replace(samples_per_example=c.samples_per_example * c.active_pool)
        if self.rank == 0:
            plan.warn_if_short()
        total = plan.total
        state = self._read_checkpoint(total)  # raises (before anything is written) on a mismatch

        torch.manual_seed(mix(c.seed, self.rank, 0xD0))
        self.optimizer = make_optimizer(c, self._optimizer_factory, self.student.parameters())
        self.scheduler = make_scheduler(c, self.optimizer, total)
        self.step = 0
        self.history = TGTHistory()
        if state is not None:
            self._restore(state)
        if cache_t is not None:  # the training inputs labelled once by the scan (again on a resume)
            self.history.teacher_queries += n
        if self.rank == 0 and c.out_dir is not None:
            os.makedirs(c.out_dir, exist_ok=True)
            ckpt.remove_stale_temporaries(c.out_dir)
            ckpt.truncate_metrics(os.path.join(c.out_dir, "metrics.jsonl"), self.step)

        model: nn.Module = self.student
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(self.student, device_ids=[device.index] if device.type == "cuda" else None)
        self.student.train()

        fetch = None
        if c.num_workers > 0 and not isinstance(dataset, (TensorPairs, Joined)):
            loader = torch.utils.data.DataLoader(
                dataset, batch_sampler=StepSampler(plan, self.step, total), collate_fn=collate,
                num_workers=c.num_workers)
            batches_iter = iter(loader)
            fetch = lambda: next(batches_iter)  # noqa: E731 - in the sampler's order, which is the loop's
        data = (dataset, collate, cache_z, cache_t, fetch)

        metrics_path = os.path.join(c.out_dir, "metrics.jsonl") if (c.out_dir and self.rank == 0) else None
        bar = progress(range(self.step, total), progress_on, desc="train", total=total, initial=self.step)
        for step in bar:
            t0 = time.perf_counter()
            epoch, batches = plan.batches(step)
            rec = self._train_step(step, batches, data, device, model)
            dt = time.perf_counter() - t0
            self.step = step + 1
            self.history.teacher_queries += rec["teacher_queries"]
            record = {"step": self.step, "epoch": epoch, "lr": rec["lr"], "loss": rec["loss"], "ce": rec["ce"],
                      "kd": rec["kd"], "tgt": rec["tgt"], "acc": rec["acc"], "teacher_queries": rec["teacher_queries"],
                      "examples_per_s": rec["examples"] / dt, "samples_per_s": rec["samples"] / dt}
            last = self.step == total
            if self.step % c.log_every == 0 or last:
                self.history.train.append(record)
                if metrics_path:
                    append_jsonl(metrics_path, record)
            if val is not None and self.rank == 0 and ((c.eval_every and self.step % c.eval_every == 0) or last):
                vrec = {"step": self.step, **self.evaluate(val)}
                self.history.val.append(vrec)
                if metrics_path:
                    append_jsonl(metrics_path, vrec)
            self.history.steps = self.step
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
            if c.checkpoint_every and self.step % c.checkpoint_every == 0 and not last:
                self._save_checkpoint()
            if callback is not None:
                callback(self, record)
        if self.world_size > 1 and val is not None:
            self.history.val = broadcast_object(self.history.val, self.world_size)  # rank 0's evaluations
        self.history.steps = self.step
        self._save_checkpoint()
        if c.out_dir is not None and self.rank == 0:
            ckpt.atomic_write(os.path.join(c.out_dir, "history.json"),
                              lambda fh: fh.write(json.dumps(self.history.to_dict(), indent=1)))
            if c.plot:
                plot_history(self.history, os.path.join(c.out_dir, "curves.png"))
        if self.world_size > 1:
            dist.barrier()
        return self.history
