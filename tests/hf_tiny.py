"""Tiny random causal LMs, token data and training arguments for the Hugging Face trainer tests (shared by
tests/test_hf_trainer*.py, tests/test_cli_distill.py and the scripts they launch)."""

import torch

V = 96


def llama(vocab=V, seed=0, hidden=32, layers=2, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, **kw)
    return LlamaForCausalLM(cfg)


def gpt2(vocab=V, seed=0, hidden=32):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return GPT2LMHeadModel(cfg)


def gemma2(vocab=V, seed=0, hidden=32, cap=2.0, init=0.5):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    cfg = Gemma2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                       final_logit_softcapping=cap, attn_logit_softcapping=None, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2, initializer_range=init)
    return Gemma2ForCausalLM(cfg)


def examples(n, length=12, vocab=V, seed=0):
    """Equal-length sequences whose labels mask a prompt of varying length (different loss tokens per example)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, vocab, (length,), generator=g)
        labels = ids.clone()
        labels[: (3 * i) % (length - 3)] = -100  # example 0 has a label at position 0 (never a target)
        out.append({"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.int64), "labels": labels})
    return out


def collate(items):
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def args(out, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(out), report_to="none", per_device_train_batch_size=2, max_steps=2,
                learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                logging_steps=1, save_strategy="no", seed=0, data_seed=0, use_cpu=True, disable_tqdm=True,
                dataloader_num_workers=0, max_grad_norm=0.0)
    base.update(kw)
    return TrainingArguments(**base)
