"""What :class:`tgtfast.integrations.transformers.DistillationTrainer` needs from a transformers causal LM: its last
hidden states without the output projection, the projection itself (gathered when it is sharded), and the
logit transforms of its config; the teacher's placement; vocabulary checks between student and teacher."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple, Union

import torch
from torch import nn

__all__ = ["causal_lm", "last_hidden_state", "output_projection", "logit_transforms", "gathered_projection",
           "ForwardRedirection", "is_sharded", "vocab_map_from_tokenizers", "as_vocab_map", "check_tokenizers",
           "map_projection", "map_input_ids"]


def _peft_base(model: nn.Module) -> Optional[nn.Module]:
    """The transformers model inside a PEFT wrapper (its adapters injected), or None when `model` is no PEFT
    model."""
    try:
        from peft import PeftModel
    except ImportError:
        return None
    return model.get_base_model() if isinstance(model, PeftModel) else None


def causal_lm(model: nn.Module) -> nn.Module:
    """The causal LM itself: `model` without a PEFT wrapper (its adapter layers stay in place)."""
    base = _peft_base(model)
    return model if base is None else base


def _backbone(lm: nn.Module, who: str) -> nn.Module:
    """The model without its output projection (``LlamaModel`` of ``LlamaForCausalLM``, ``GPT2Model`` of
    ``GPT2LMHeadModel``): transformers' ``base_model``."""
    backbone = getattr(lm, "base_model", None)
    if backbone is None or backbone is lm or not isinstance(backbone, nn.Module):
        raise ValueError(
            f"the {who} ({type(lm).__name__}) has no base model separate from its output projection "
            "(transformers' `base_model`, e.g. LlamaForCausalLM.model): the fused loss needs the last hidden states "
            "before the output projection")
    return backbone


def last_hidden_state(lm: nn.Module, inputs: Mapping[str, Any], who: str) -> torch.Tensor:
    """``[B, L, H]`` last hidden states of the causal LM `lm` on `inputs` (the final norm applied, the output
    projection not): the backbone's ``last_hidden_state``."""
    out = _backbone(lm, who)(**inputs, use_cache=False)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        hidden = out[0]
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ValueError(f"the {who}'s base model ({type(_backbone(lm, who)).__name__}) returned no last hidden "
                         f"states [B, L, H] (got {type(out).__name__}); the fused loss needs them")
    return hidden


def output_projection(lm: nn.Module, who: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(weight [V, H], bias [V] or None)`` of the causal LM's output projection (``get_output_embeddings()``)."""
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"the {who} ({type(lm).__name__}) has no output embeddings (get_output_embeddings() is None):"
                         " the fused loss needs its output projection")
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        BaseTunerLayer = ()
    if BaseTunerLayer and isinstance(head, BaseTunerLayer):
        raise ValueError(f"the {who}'s output projection carries a PEFT adapter: the fused loss reads its weight and "
                         "would never train the adapter; leave the output projection out of target_modules (or list "
                         "it under modules_to_save)")
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"the {who}'s output embeddings ({type(head).__name__}) have no weight tensor")
    bias = getattr(head, "bias", None)
    return weight, bias if isinstance(bias, torch.Tensor) else None


def logit_transforms(lm: nn.Module) -> Tuple[Optional[float], Optional[float]]:
    """``(scale, softcap)`` a causal LM applies to its projection's logits, read from its (text) config: Cohere's
    ``logit_scale``, Granite's ``1 / logits_scaling``, ``output_multiplier`` / ``lm_head_multiplier``, and Gemma
    2/3's ``final_logit_softcapping``; None where the model has none."""
    config = getattr(lm, "config", None)
    if config is None:
        return None, None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(lm, name, getattr(config, name, None))  # the model's copy first (Cohere keeps one)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            scale = float(value)
            break
    scaling = getattr(config, "logits_scaling", None)
    if scale is None and isinstance(scaling, (int, float)) and not isinstance(scaling, bool) and scaling:
        scale = 1.0 / float(scaling)
    cap = getattr(config, "final_logit_softcapping", None)
    cap = float(cap) if isinstance(cap, (int, float)) and not isinstance(cap, bool) and cap > 0 else None
    return (None if scale == 1.0 else scale), cap


def is_sharded(t: torch.Tensor) -> bool:
    """Whether `t` is a shard of a parameter (an FSDP2 DTensor, or a DeepSpeed ZeRO-3 partition)."""
    return hasattr(t, "ds_id") or type(t).__name__ == "DTensor"


@contextlib.contextmanager
def gathered_projection(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Iterator[Tuple[torch.Tensor, Any]]:
    """The full output projection while the context is open.

    * FSDP2 (``fully_shard``): a DTensor weight becomes ``weight.full_tensor()`` (differentiable: its gradient is
      reduce-scattered back to the shards).
    * DeepSpeed ZeRO-3 (a parameter with ``ds_id``): ``deepspeed.zero.GatheredParameters`` (written, untested).
    * FSDP1: the loss runs inside the wrapped model's forward, where the parameters of the root unit (the
      output projection, unless wrapped on its own) are already unsharded; a projection that is still flat is a
      clear error.
    """
    params = [p for p in (weight, bias) if p is not None]
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed  # noqa: F401  (a ZeRO-3 parameter exists only with deepspeed installed)

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield weight, bias
        return
    if type(weight).__name__ == "DTensor":
        weight = weight.full_tensor()
        bias = bias.full_tensor() if type(bias).__name__ == "DTensor" else bias
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(
            f"the output projection is sharded here (shape {tuple(weight.shape)}): keep it in the root FSDP unit "
            "(wrap only the decoder layers, e.g. fsdp_config transformer_layer_cls_to_wrap) so that it is "
            "unsharded while the loss runs inside the model's forward")
    yield weight, bias


class ForwardRedirection:
    """Run ``method(*args, **kwargs)`` as the forward of `original`, called through `wrapper` (DDP, FSDP,
    DeepSpeed), so that the wrapper's forward-time work happens around it: DDP prepares its gradient reduction,
    FSDP gathers the parameters. `wrapper` may be `original` itself: its forward hooks (FSDP2's ``fully_shard``
    gathers the root's parameters in one) still run. The method of PyTorch Lightning's strategies, also used by
    TRL."""

    def __call__(self, wrapper: nn.Module, original: nn.Module, method: Callable, *args: Any, **kwargs: Any) -> Any:
        forward = original.__dict__.get("forward")  # an instance attribute (accelerate's autocast wrapper) or None

        def restore() -> None:
            if forward is None:
                original.__dict__.pop("forward", None)
            else:
                original.forward = forward

        def redirected(*_a: Any, **_k: Any) -> Any:
            restore()
            return method(*_a, **_k)

        original.forward = redirected
        try:
            return wrapper(*args, **kwargs)
        finally:
            restore()


# ------------------------------------------------------------------------------------------------ vocabularies


def vocab_map_from_tokenizers(student_tokenizer: Any, teacher_tokenizer: Any) -> torch.Tensor:
    """``[V_student]`` int64: for each student token id, the teacher's id of the same token string (``-1`` where
    the teacher has no such token). Pass it as ``vocab_map=`` when the two tokenizers segment text the same way
    but number their tokens differently (added special tokens, another order)."""
    s_vocab, t_vocab = _vocab("student tokenizer", student_tokenizer), _vocab("teacher tokenizer", teacher_tokenizer)
    size = max(s_vocab.values()) + 1 if s_vocab else 0
    out = torch.full((size,), -1, dtype=torch.int64)
    for token, i in s_vocab.items():
        out[i] = t_vocab.get(token, -1)
    return out


def _vocab(name: str, tokenizer: Any) -> Dict[str, int]:
    get = getattr(tokenizer, "get_vocab", None)
    if get is None:
        raise TypeError(f"{name} must have get_vocab() (a transformers tokenizer), got {type(tokenizer).__name__}")
    return dict(get())


def check_tokenizers(student_tokenizer: Any, teacher_tokenizer: Any, vocab_map: Any) -> None:
    """Refuse two tokenizers with different vocabularies (``get_vocab()``) unless `vocab_map` states how they
    map: the teacher's distribution over its token ids means nothing to a student numbering tokens otherwise."""
    if student_tokenizer is None or teacher_tokenizer is None or vocab_map is not None:
        return
    s_vocab = _vocab("processing_class", student_tokenizer)
    t_vocab = _vocab("teacher_tokenizer", teacher_tokenizer)
    if s_vocab == t_vocab:
        return
    only_s = sorted(set(s_vocab) - set(t_vocab))[:3]
    moved = sorted(k for k in set(s_vocab) & set(t_vocab) if s_vocab[k] != t_vocab[k])[:3]
    detail = []
    if only_s:
        detail.append(f"tokens only the student has: {only_s}")
    if moved:
        detail.append(f"tokens with other ids: {moved}")
    if len(s_vocab) != len(t_vocab):
        detail.append(f"sizes {len(s_vocab)} (student) vs {len(t_vocab)} (teacher)")
    raise ValueError(
        "the student's tokenizer (processing_class) and teacher_tokenizer have different vocabularies ("
        + "; ".join(detail) + "): distillation compares the two models' distributions token id by token id. Pass "
        "vocab_map=tgtfast.integrations.transformers.vocab_map_from_tokenizers(student_tok, teacher_tok) to map "
        "the ids by token string, or vocab_map='identity' if the ids do mean the same tokens")


def as_vocab_map(vocab_map: Any, student_vocab: int, teacher_vocab: int) -> Union[None, str, torch.Tensor]:
    """Check `vocab_map`: None, ``"identity"``, or a sequence / 1-D integer tensor of length ``student_vocab``
    whose entries are teacher ids in ``[0, teacher_vocab)`` or ``-1`` (no such token)."""
    if vocab_map is None or (isinstance(vocab_map, str) and vocab_map == "identity"):
        return vocab_map
    if isinstance(vocab_map, str):
        raise ValueError(f"vocab_map must be 'identity', a sequence or a 1-D integer tensor, got {vocab_map!r}")
    m = torch.as_tensor(vocab_map) if not isinstance(vocab_map, torch.Tensor) else vocab_map.detach().cpu()
    if m.dtype.is_floating_point or m.dtype == torch.bool or m.dim() != 1:
        raise TypeError(f"vocab_map must be a 1-D integer sequence (student id -> teacher id), got {m.dtype} "
                        f"{tuple(m.shape)}")
    if m.shape[0] != student_vocab:
        raise ValueError(f"vocab_map has {m.shape[0]} entries but the student's output projection has "
                         f"{student_vocab} rows (one entry per student id)")
    bad = (m < -1) | (m >= teacher_vocab)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"vocab_map[{i}] = {int(m[i])} is neither -1 nor a teacher id in [0, {teacher_vocab})")
    if not bool((m >= 0).any()):
        raise ValueError("vocab_map maps no student id to a teacher id")
    return m.to(torch.int64)


def map_projection(weight: torch.Tensor, bias: Optional[torch.Tensor],
                   vocab_map: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The teacher's projection in the student's ids: row ``j`` is the teacher's row ``vocab_map[j]``; unmapped
    ids get a zero row and bias ``-inf`` (no teacher probability)."""
    m = vocab_map.to(weight.device)
    mapped = m >= 0
    rows = weight.index_select(0, m.clamp_min(0)) * mapped.unsqueeze(1).to(weight.dtype)
    base = bias.index_select(0, m.clamp_min(0)) if bias is not None else weight.new_zeros(m.shape[0])
    out_bias = torch.where(mapped, base, torch.full_like(base, float("-inf")))
    return rows, out_bias


def map_input_ids(input_ids: torch.Tensor, vocab_map: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """The student's input ids in the teacher's ids; an id without a teacher token (where `valid`) is an error."""
    m = vocab_map.to(input_ids.device)
    out = m[input_ids]
    bad = out < 0 if valid is None else (out < 0) & valid.bool()
    if bool(bad.any()):
        i = int(input_ids[bad][0])
        raise ValueError(f"input id {i} has no teacher token in vocab_map (maps to -1): the teacher cannot read it")
    return out.clamp_min(0)
