"""Knowledge distillation with the Hugging Face :class:`transformers.Trainer`: :class:`DistillationTrainer` trains a
student causal LM against a frozen teacher (live, or cached top-k outputs from :mod:`tgtfast.cache`) with
:func:`tgtfast.fused_linear_distill_loss`, so the ``[B, T, V]`` logits of neither model are ever materialised.
``tgtfast distill --config FILE.yaml`` runs it from a YAML file (:mod:`tgtfast.cli.distill`).

Importing this module imports transformers (``import tgtfast`` does not).

Example::

    from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, TrainingArguments
    from tgtfast.integrations.transformers import DistillationTrainer

    trainer = DistillationTrainer(
        model=student, args=TrainingArguments("out", report_to="none", bf16=True),
        train_dataset=tokenized, data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        processing_class=tok, teacher_model=teacher, teacher_tokenizer=teacher_tok,
        divergence="jsd", beta=0.5, temperature=2.0, kd_weight=1.0, ce_weight=0.5)
    trainer.train()

API
---

``DistillationTrainer(model, args, data_collator, train_dataset, eval_dataset, processing_class, *,
teacher_model=None, teacher_tokenizer=None, divergence="forward_kl", divergence_kwargs=None, beta=None,
alpha=None, lam=None, t=None, temperature=1.0, kd_weight=1.0, ce_weight=0.0, t2_scaling=False,
vocab_mismatch="error", vocab_map=None, chunk_size=None, backend=None, **trainer_kwargs)``

* Everything of :class:`transformers.Trainer` (``trainer_kwargs``: callbacks, optimizers, compute_metrics, ...)
  except ``compute_loss_func``: the trainer computes its own loss.
* ``teacher_model``: a transformers causal LM (or a PEFT model). Frozen (``eval()``, ``requires_grad_(False)``,
  run under ``no_grad``), cast to the student's parameter dtype and placed on the training device; under DDP each
  process holds a copy (never wrapped in DDP), under FSDP it is prepared by accelerate for evaluation (sharded like
  the student), under DeepSpeed ZeRO-3 by ``deepspeed.initialize`` (written, untested). ``None``: the batches
  carry a cached teacher (below).
* ``divergence``: any of :data:`tgtfast.DIVERGENCES` (``forward_kl``, ``reverse_kl``, ``jsd``, ``skew_kl``,
  ``skew_reverse_kl``, ``tvd``, ``symmetric_kl``, ``ab_divergence``, ``taid``); its parameters ``beta``,
  ``alpha``, ``lam``, ``t`` as keywords or as ``divergence_kwargs={"beta": 0.5}``. An unknown name or parameter
  is a ValueError. ``trainer.divergence_params`` may be changed by a callback during training.
* ``taid_schedule``: a :class:`tgtfast.TAIDSchedule` (with ``divergence="taid"``) that moves TAID's ``t``: after
  every optimiser step it takes the step's divergence per loss token (over the micro-batches and processes) and its
  new ``t`` is used by the next step; its state is saved in each checkpoint (``taid_schedule.json``) and restored
  by ``resume_from_checkpoint``.
* ``temperature``: the loss temperature (both models' logits divided by it; nothing to do with sampling);
  ``t2_scaling`` multiplies the divergence by ``T**2``.
* ``kd_weight`` / ``ce_weight``: loss = ``kd_weight * divergence + ce_weight * cross_entropy(labels)`` (the hard
  loss at temperature 1).
* ``vocab_mismatch``: student and teacher projections with different numbers of rows: ``"error"`` (default; the
  message names both sizes), ``"slice"`` (the first ``min`` classes of both) or ``"pad"`` (``-inf`` logits for
  the smaller one's missing classes).
* ``teacher_tokenizer`` with ``processing_class``: when both are given and their ``get_vocab()`` differ, the
  trainer refuses (ValueError) unless ``vocab_map`` says how student ids map to teacher ids: ``"identity"`` (the
  ids mean the same tokens), or a ``[V_student]`` integer sequence of teacher ids (``-1``: no teacher token), e.g.
  :func:`vocab_map_from_tokenizers`. With a map the teacher reads the student's input ids mapped to its own and
  its projection rows are gathered in the student's order (unmapped ids: no teacher probability). Both models
  must segment text alike: this is a token-id mapping, not cross-tokenizer distillation.
* ``chunk_size``, ``backend``: passed to :func:`tgtfast.fused_linear_distill_loss`.

The loss, per optimiser step:

* hidden states: the student's backbone (transformers' ``base_model``: ``LlamaModel`` of ``LlamaForCausalLM``,
  ``GPT2Model`` of ``GPT2LMHeadModel``; through a PEFT wrapper with its adapters active) returns its last hidden
  states, so the output projection never runs as a layer; the projection is ``get_output_embeddings()`` (bias
  included), with the model's logit scale (Cohere ``logit_scale``, Granite ``logits_scaling``) and final
  soft-capping (Gemma 2/3 ``final_logit_softcapping``) read from its config and applied chunk by chunk. The same
  for the teacher. A model without a separate base model or without output embeddings, or a backbone returning no
  hidden states, is a clear ValueError; so is a PEFT adapter on the output projection.
* rows: the causal shift (hidden state ``t`` predicts token ``t + 1``). A row counts when its shifted label is
  not ``-100`` (prompt tokens masked in ``labels`` give completion-only distillation; without labels, where the
  attention mask is 1; a ``shift_labels`` batch key is taken as already shifted).
* normalisation: the sum over the step's loss tokens divided by their number over all gradient-accumulation
  micro-batches and all processes (``num_items_in_batch``, counted by :meth:`get_batch_samples` and gathered across
  processes as Trainer does with ``average_tokens_across_devices``; the loss is multiplied by the number of
  processes because DDP averages gradients). So 4 micro-batches of 1 equal one batch of 4, and 2 processes equal 1.
* logging: ``kd_loss`` (the divergence) and, with ``ce_weight > 0``, ``ce_loss`` (the cross-entropy), unweighted
  per-token means over the logging window and all processes, next to Trainer's ``loss``; ``eval_kd_loss`` /
  ``eval_ce_loss`` in evaluation (where ``eval_loss`` is the combined loss per token).
* sharded students: under DDP/FSDP/DeepSpeed the loss runs as the wrapped model's forward (forward redirection),
  so DDP prepares its reduction and FSDP has the root unit's parameters gathered (keep the output projection in
  the root unit: wrap only the decoder layers); an FSDP2 DTensor projection is gathered with ``full_tensor()``, a
  ZeRO-3 one with ``deepspeed.zero.GatheredParameters`` (untested). Tested on the CPU: one process; DDP through
  ``Trainer.train`` under ``torchrun`` (gloo); the loss of a student sharded by torch's FSDP2 ``fully_shard``
  (decoder layers and root) under ``torchrun``, outside ``Trainer.train``, because accelerate refuses FSDP
  without a GPU (or other accelerator). Written, untested: ``Trainer.train`` under FSDP (accelerate's FSDP
  plugin, FSDP1 or 2) and DeepSpeed.

Cached teachers: build the dataset with :class:`tgtfast.CachedTeacherDataset` and batch it with
:class:`tgtfast.TeacherCollator` (``shift_labels=False``, the default: labels stay transformers-style); each batch
carries ``teacher``, a :class:`tgtfast.SparseTeacher` aligned with the student's positions, and ``teacher_mask``.
Pass ``teacher_model=None``; rows the cache does not cover are left out of the loss. The trainer keeps these keys
when ``remove_unused_columns`` drops the others.

Checkpoints: Trainer's own (``save_steps``, ``resume_from_checkpoint``); the teacher is not saved (it is an input).

``vocab_map_from_tokenizers(student_tokenizer, teacher_tokenizer) -> LongTensor [V_student]``: teacher ids by
token string (``-1`` where the teacher has no such token).

``loss_targets(batch) -> LongTensor [B, L - 1]``: the targets of the next-token rows as the loss takes them.
"""

from __future__ import annotations

from tgtfast.integrations.hf.models import vocab_map_from_tokenizers
from tgtfast.integrations.hf.trainer import DistillationTrainer, loss_targets

__all__ = ["DistillationTrainer", "vocab_map_from_tokenizers", "loss_targets"]
