"""The :class:`DistillationTrainer` (documented in :mod:`tgtfast.integrations.transformers`)."""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from tgtfast import validation as V
from tgtfast.integrations.hf import models as M
from tgtfast.losses import divergence as D
from tgtfast.losses.sparse import SparseTeacher
from tgtfast.losses.taid import TAIDSchedule

__all__ = ["DistillationTrainer", "loss_targets"]

IGNORE = -100
VOCAB_MISMATCH = ("error", "slice", "pad")
# Batch keys the loss reads itself; the others go to the models.
_LOSS_KEYS = ("labels", "shift_labels", "teacher", "teacher_mask", "num_items_in_batch")
_TEACHER_INPUTS = ("input_ids", "attention_mask", "position_ids")
# Item and batch keys remove_unused_columns must keep: the labels and a cached teacher (CachedTeacherDataset items,
# TeacherCollator batches).
_KEEP_COLUMNS = ("labels", "shift_labels", "teacher", "teacher_mask", "teacher_positions", "teacher_indices",
                 "teacher_logprobs")


def loss_targets(batch: Mapping[str, Any]) -> torch.Tensor:
    """``[B, L - 1]`` targets of the next-token rows ``0 .. L - 2`` (``-100`` where no loss is taken): the labels
    shifted left by one (``shift_labels`` as given when the batch has them), else the next input ids where the
    attention mask is 1; rows a cached teacher does not cover (``teacher_mask``) are ignored too."""
    labels = batch.get("shift_labels")
    shifted = labels is not None
    if labels is None:
        labels = batch.get("labels")
    if labels is None:
        ids = batch.get("input_ids")
        if ids is None:
            raise ValueError("a distillation batch needs input_ids (and labels, or an attention_mask)")
        labels = ids
        mask = batch.get("attention_mask")
        if mask is not None:
            labels = labels.masked_fill(mask == 0, IGNORE)
    if not shifted:
        labels = labels[:, 1:]
    else:
        labels = labels[:, :-1]
    teacher_mask = batch.get("teacher_mask")
    if teacher_mask is not None:
        labels = labels.masked_fill(~teacher_mask[:, :-1].to(torch.bool).to(labels.device), IGNORE)
    return labels


class DistillationTrainer(Trainer):
    """A :class:`transformers.Trainer` distilling a frozen teacher into the student with
    :func:`tgtfast.fused_linear_distill_loss` (documented in :mod:`tgtfast.integrations.transformers`)."""

    def __init__(
        self,
        model: Union[nn.Module, None] = None,
        args: Any = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        *,
        teacher_model: Optional[nn.Module] = None,
        teacher_tokenizer: Any = None,
        divergence: str = "forward_kl",
        divergence_kwargs: Optional[Mapping[str, float]] = None,
        beta: Optional[float] = None,
        alpha: Optional[float] = None,
        lam: Optional[float] = None,
        t: Optional[float] = None,
        temperature: float = 1.0,
        kd_weight: float = 1.0,
        ce_weight: float = 0.0,
        t2_scaling: bool = False,
        vocab_mismatch: str = "error",
        vocab_map: Any = None,
        chunk_size: Optional[int] = None,
        backend: Optional[str] = None,
        taid_schedule: Optional[TAIDSchedule] = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("DistillationTrainer computes its own loss: compute_loss_func is not taken")
        params = dict(beta=beta, alpha=alpha, lam=lam, t=t)
        for name, value in dict(divergence_kwargs or {}).items():
            if name not in params:
                raise ValueError(f"divergence_kwargs: unknown parameter {name!r} (divergence parameters are beta, "
                                 "alpha, lam, t)")
            if params[name] is not None:
                raise ValueError(f"{name} is given both as a keyword and in divergence_kwargs")
            params[name] = value
        if taid_schedule is not None:
            if not isinstance(taid_schedule, TAIDSchedule):
                raise TypeError(f"taid_schedule must be a tgtfast.TAIDSchedule, got {type(taid_schedule).__name__}")
            if divergence != "taid":
                raise ValueError(f"taid_schedule moves TAID's t: it needs divergence='taid', got {divergence!r}")
            if params["t"] is not None:
                raise ValueError("t is given both directly and by taid_schedule: pass one")
            params["t"] = taid_schedule.t
        D.resolve(divergence, **params)  # unknown names and bad parameters: a ValueError naming them
        self.divergence = divergence
        self.divergence_params = {k: v for k, v in params.items() if v is not None}
        self.temperature = V.temperature(temperature)
        self.kd_weight = V.real("kd_weight", kd_weight, low=0.0)
        self.ce_weight = V.real("ce_weight", ce_weight, low=0.0)
        self.t2_scaling = V.boolean("t2_scaling", t2_scaling)
        self.vocab_mismatch = V.choice("vocab_mismatch", vocab_mismatch, VOCAB_MISMATCH)
        if chunk_size is not None:
            V.integer("chunk_size", chunk_size, low=1)
        self.chunk_size, self.backend = chunk_size, backend
        if teacher_model is not None and not isinstance(teacher_model, nn.Module):
            raise TypeError(f"teacher_model must be a torch.nn.Module (a transformers causal LM), got "
                            f"{type(teacher_model).__name__}")
        M.check_tokenizers(processing_class, teacher_tokenizer, vocab_map)
        self.vocab_map = None
        if teacher_model is not None and model is not None:
            s_rows = M.output_projection(M.causal_lm(model), "student")[0].shape[0]
            t_rows = M.output_projection(M.causal_lm(teacher_model), "teacher")[0].shape[0]
            self.vocab_map = M.as_vocab_map(vocab_map, s_rows, t_rows)
            if not isinstance(self.vocab_map, torch.Tensor) and s_rows != t_rows and self.vocab_mismatch == "error":
                raise ValueError(
                    f"the student's output projection has {s_rows} rows (vocabulary size) but the teacher's has "
                    f"{t_rows}: pass vocab_mismatch='slice' (keep the first {min(s_rows, t_rows)} classes of both: "
                    f"the extra rows are padding of the larger embedding) or 'pad' (-inf teacher/student logits up to "
                    f"{max(s_rows, t_rows)}), or a vocab_map")
        elif vocab_map is not None:
            self.vocab_map = vocab_map if isinstance(vocab_map, str) else torch.as_tensor(vocab_map)
        self._mapped_teacher: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self._kd_stats: Dict[str, torch.Tensor] = {}
        self.taid_schedule = taid_schedule
        self._taid_stats: Optional[torch.Tensor] = None  # (soft loss sum, loss tokens) of the current step
        self._redirect = M.ForwardRedirection()
        super().__init__(model, args, data_collator, train_dataset, eval_dataset, processing_class, **kwargs)
        if taid_schedule is not None:
            self.add_callback(_TAIDStep(self))
        self.teacher_model = None if teacher_model is None else self._prepare_teacher(teacher_model)

    # ------------------------------------------------------------------------------------------------ setup

    # The loss divides by the loss tokens of the whole optimiser step (num_items_in_batch): training_step must not
    # divide by the accumulation steps again.
    loss_is_scaled_for_ga = True

    def _prepare_teacher(self, teacher: nn.Module) -> nn.Module:
        """Freeze the teacher (eval mode, no gradients) and place it like the student: its device and dtype;
        under FSDP prepared by accelerate for evaluation, under DeepSpeed ZeRO-3 by deepspeed (not wrapped in
        DDP: it takes no gradient)."""
        teacher.eval()
        teacher.requires_grad_(False)
        dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), None)
        if dtype is not None:
            teacher.to(dtype=dtype)
        if self.is_deepspeed_enabled:
            return _prepare_deepspeed_teacher(teacher, self.accelerator)
        if self.is_fsdp_enabled:
            return self.accelerator.prepare_model(teacher, evaluation_mode=True)
        return teacher.to(self.args.device)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        for key in _KEEP_COLUMNS:
            if key not in self._signature_columns:
                self._signature_columns.append(key)

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """The batches of one optimiser step and their loss tokens, all processes together (when
        ``average_tokens_across_devices``, the default), counted as the loss counts them."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batches:
            return batches, None
        count = sum(int((loss_targets(b) != IGNORE).sum()) for b in batches)
        count = torch.tensor(count, dtype=torch.int64, device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return batches, count

    # ------------------------------------------------------------------------------------------------ the loss

    def compute_loss(self, model: nn.Module, inputs: Dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Union[torch.Tensor, int, None] = None):
        """``kd_weight * divergence + ce_weight * cross-entropy``, summed over this batch's loss tokens and divided
        by `num_items_in_batch` (the loss tokens of the optimiser step over all processes; this batch's own
        count when None), times the number of processes when the count spans them (DDP averages gradients)."""
        student = self.accelerator.unwrap_model(model)
        target = loss_targets(inputs).to(self.args.device)
        local = (target != IGNORE).sum()
        if num_items_in_batch is None:
            denom, spans = local.clamp_min(1), False
        else:
            denom = torch.as_tensor(num_items_in_batch, device=target.device).clamp_min(1)
            spans = self.args.average_tokens_across_devices and self.args.world_size > 1
        loss, soft, hard = self._redirect(model, student, functools.partial(self._loss, student), inputs, target,
                                          denom)
        if spans:
            loss = loss * self.accelerator.num_processes
        mode = "train" if model.training else "eval"
        stats = torch.stack([(soft * denom).double().detach(), (hard * denom).double().detach(),
                             local.double()]).to(target.device)
        self._kd_stats[mode] = stats if mode not in self._kd_stats else self._kd_stats[mode] + stats
        if mode == "train" and self.taid_schedule is not None:
            step = stats[[0, 2]]
            self._taid_stats = step if self._taid_stats is None else self._taid_stats + step
        return (loss, {"loss": loss}) if return_outputs else loss

    # ------------------------------------------------------------------------------------------------ TAID

    def _taid_advance(self) -> None:
        """After an optimiser step: the step's TAID objective (the divergence per loss token, over its micro-batches
        and processes) advances the schedule, whose new ``t`` the next step's loss takes."""
        stats, self._taid_stats = self._taid_stats, None
        if stats is None:
            return
        if self.accelerator.num_processes > 1:
            stats = self.accelerator.reduce(stats, reduction="sum")
        if float(stats[1]) > 0:
            self.taid_schedule.step(float(stats[0]) / float(stats[1]))
        self.divergence_params["t"] = self.taid_schedule.t

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if self.taid_schedule is not None and self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            with open(os.path.join(folder, _TAID_FILE), "w") as fh:
                json.dump(self.taid_schedule.state_dict(), fh)

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if self.taid_schedule is None or checkpoint is None:
            return
        path = os.path.join(checkpoint, _TAID_FILE)
        if not os.path.isfile(path):
            raise ValueError(f"{checkpoint} holds no TAID schedule state ({_TAID_FILE}): it was not written by a "
                             "DistillationTrainer with taid_schedule; resuming would restart t")
        with open(path) as fh:
            self.taid_schedule.load_state_dict(json.load(fh))
        self.divergence_params["t"] = self.taid_schedule.t

    def _loss(self, student: nn.Module, inputs: Mapping[str, Any], target: torch.Tensor, denom: torch.Tensor):
        """The loss and its unweighted soft and hard parts; runs as the student's forward (inside DDP/FSDP)."""
        from tgtfast.losses.fused_linear_distill import fused_linear_distill_loss

        lm = M.causal_lm(student)
        model_inputs = {k: v for k, v in inputs.items() if k not in _LOSS_KEYS}
        with self.accelerator.autocast():
            hidden = M.last_hidden_state(lm, model_inputs, "student")[:, :-1]  # rows 0 .. L - 2: loss_targets
        sparse = inputs.get("teacher")
        s_scale, s_cap = M.logit_transforms(lm)
        t_scale = t_cap = None
        if sparse is not None:
            if not isinstance(sparse, SparseTeacher):
                raise TypeError(f"batch['teacher'] must be a tgtfast.SparseTeacher (from TeacherCollator), got "
                                f"{type(sparse).__name__}")
            teacher_hidden = SparseTeacher(sparse.indices[:, :-1], sparse.logprobs[:, :-1], tail=sparse.tail,
                                           temperature=sparse.temperature).to(hidden.device)
            teacher_weight = teacher_bias = None
        elif self.teacher_model is None:
            raise ValueError("no teacher: pass teacher_model=, or batches with a cached teacher (a 'teacher' "
                             "SparseTeacher from tgtfast's TeacherCollator)")
        else:
            teacher_hidden, teacher_weight, teacher_bias, (t_scale, t_cap) = self._teacher(model_inputs, target)
        with M.gathered_projection(*M.output_projection(lm, "student")) as (weight, bias):
            loss, soft, hard = fused_linear_distill_loss(
                hidden, weight, teacher_hidden, teacher_weight, self.divergence, **self.divergence_params,
                student_bias=bias, teacher_bias=teacher_bias, temperature=self.temperature, target=target,
                ignore_index=IGNORE, reduction="mean", num_items_in_batch=denom, kd_weight=self.kd_weight,
                ce_weight=self.ce_weight, t2_scaling=self.t2_scaling, logit_scale=_pair(s_scale, t_scale),
                logit_softcap=_pair(s_cap, t_cap),
                vocab_mismatch=None if self.vocab_mismatch == "error" else self.vocab_mismatch,
                return_parts=True, chunk_size=self.chunk_size, backend=self.backend)
        return loss, soft, hard

    def _teacher(self, model_inputs: Mapping[str, Any], target: torch.Tensor):
        """The teacher's last hidden states of rows ``0 .. L - 2``, its projection (in the student's ids under a
        vocab_map; a copy when it is sharded) and its logit transforms."""
        teacher = self.teacher_model
        inner = self.accelerator.unwrap_model(teacher)
        lm = M.causal_lm(inner)
        inputs = {k: v for k, v in model_inputs.items() if k in _TEACHER_INPUTS}
        if isinstance(self.vocab_map, torch.Tensor) and "input_ids" in inputs:
            inputs["input_ids"] = M.map_input_ids(inputs["input_ids"], self.vocab_map, inputs.get("attention_mask"))

        def run() -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
            with self.accelerator.autocast():
                hidden = M.last_hidden_state(lm, inputs, "teacher")[:, :-1]
            weight, bias = M.output_projection(lm, "teacher")
            if teacher is not inner or M.is_sharded(weight):  # gathered only for this forward: keep a copy
                with M.gathered_projection(weight, bias) as (w, b):
                    weight, bias = w.detach().clone(), None if b is None else b.detach().clone()
            return hidden, weight, bias

        teacher.eval()
        with torch.no_grad():
            hidden, weight, bias = self._redirect(teacher, inner, run)
            if isinstance(self.vocab_map, torch.Tensor):
                weight, bias = self._map_teacher(weight, bias, cache=teacher is inner)
        return hidden, weight, bias, M.logit_transforms(lm)

    def _map_teacher(self, weight: torch.Tensor, bias: Optional[torch.Tensor], cache: bool):
        """The teacher's projection in the student's ids (computed once when the teacher's weights stay put)."""
        if cache and self._mapped_teacher is not None and self._mapped_teacher[0].device == weight.device:
            return self._mapped_teacher
        mapped = M.map_projection(weight, bias, self.vocab_map)
        if cache:
            self._mapped_teacher = mapped
        return mapped

    # ------------------------------------------------------------------------------------------------ eval, logs

    def prediction_step(self, model: nn.Module, inputs: Dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: Optional[List[str]] = None):
        """The distillation loss of one evaluation batch (per loss token); no logits are returned."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: Dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds ``kd_loss`` (the divergence) and, with ``ce_weight > 0``, ``ce_loss`` (the cross-entropy), unweighted
        means per loss token over the logging window and all processes (``eval_`` prefixed in evaluation)."""
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        stats = self._kd_stats.pop(mode, None)
        if stats is not None:
            if self.accelerator.num_processes > 1:
                stats = self.accelerator.reduce(stats, reduction="sum")
            tokens = max(float(stats[2]), 1.0)
            prefix = "eval_" if mode == "eval" else ""
            logs[prefix + "kd_loss"] = float(stats[0]) / tokens
            if self.ce_weight != 0:
                logs[prefix + "ce_loss"] = float(stats[1]) / tokens
        super().log(logs, *args, **kwargs)


_TAID_FILE = "taid_schedule.json"


class _TAIDStep(TrainerCallback):
    """Advances a DistillationTrainer's TAID schedule at the end of every optimiser step."""

    def __init__(self, trainer: DistillationTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._taid_advance()


def _pair(student: Optional[float], teacher: Optional[float]):
    return None if student is None and teacher is None else (student, teacher)


def _prepare_deepspeed_teacher(teacher: nn.Module, accelerator: Any) -> nn.Module:
    """A frozen teacher as a DeepSpeed inference engine with the training run's ZeRO stage (ZeRO-3: its
    parameters partitioned like the student's). Written after TRL's ``prepare_deepspeed``; untested (no
    DeepSpeed here)."""
    import copy

    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage != 3:
        return teacher.to(accelerator.device)
    hidden = getattr(getattr(teacher, "config", None), "hidden_size", None)
    if hidden is not None:
        config["zero_optimization"].update({"reduce_bucket_size": hidden * hidden,
                                            "stage3_param_persistence_threshold": 10 * hidden,
                                            "stage3_prefetch_bucket_size": 0.9 * hidden * hidden})
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    return engine
