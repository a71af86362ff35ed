"""DistillationTrainer (tgtfast.integrations.transformers) on tiny random transformers models: its loss against a
hand-written eager step on materialised logits (tgtfast.reference), gradient accumulation, checkpoint/resume,
PEFT, bf16, cached top-k teachers, soft-capping and logit scale, vocabulary and tokenizer mismatches."""

import math
import os
import sys

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tgtfast import reference  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_tiny as H  # noqa: E402

from tgtfast.integrations.transformers import DistillationTrainer, vocab_map_from_tokenizers  # noqa: E402

torch.set_num_threads(1)


def _trainer(tmp_path, student, teacher, data=None, **kw):
    targs = kw.pop("targs", {})
    return DistillationTrainer(student, H.args(tmp_path / "out", **targs), H.collate, data, teacher_model=teacher,
                               **kw)


def _eager(student, teacher_logits, batch, divergence, param_a=0.0, T=1.0, kd=1.0, ce=0.0, count=None):
    """The distillation step written out: the student's logits materialised by its own forward, shifted."""
    s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    t = teacher_logits[:, :-1]
    target = batch["labels"][:, 1:]
    valid = target != -100
    n = int(valid.sum()) if count is None else count
    rows = reference.divergence_rows(s.float() / T, t.float() / T, divergence, param_a=param_a)
    loss = kd * torch.where(valid, rows, 0).sum() / n
    if ce:
        ce_rows = F.cross_entropy(s.float().flatten(0, 1), target.clamp_min(0).flatten(), reduction="none")
        loss = loss + ce * torch.where(valid.flatten(), ce_rows, 0).sum() / n
    return loss


def _teacher_logits(teacher, batch):
    with torch.no_grad():
        return teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(a, b, rtol=1e-4, atol=1e-6):
    assert a.keys() == b.keys() and a
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_loss_and_grads_equal_eager_step(tmp_path, arch):
    make = getattr(H, arch)
    student, teacher = make(seed=0), make(seed=1, hidden=48)
    batch = H.collate(H.examples(3))
    tr = _trainer(tmp_path, student, teacher, divergence="jsd", beta=0.3, temperature=2.0, ce_weight=0.5)
    for count in (None, 50):
        student.zero_grad()
        loss = tr.compute_loss(student, batch, num_items_in_batch=count)
        loss.backward()
        got = _grads(student)
        student.zero_grad()
        want = _eager(student, _teacher_logits(teacher, batch), batch, "jsd", 0.3, 2.0, 1.0, 0.5, count)
        want.backward()
        torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-5, atol=1e-6)
        _assert_grads_close(got, _grads(student))
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training


@pytest.mark.parametrize("arch", ["gemma2", "cohere"])
def test_logit_softcapping_and_scale_are_applied(tmp_path, arch):
    if arch == "gemma2":
        student, teacher = H.gemma2(seed=0, cap=2.0), H.gemma2(seed=1, cap=3.0)
        off = dict(final_logit_softcapping=None)
    else:
        from transformers import CohereConfig, CohereForCausalLM

        def cohere(seed, scale):
            torch.manual_seed(seed)
            return CohereForCausalLM(CohereConfig(vocab_size=H.V, hidden_size=32, intermediate_size=64,
                                                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                                  logit_scale=scale, initializer_range=0.5, pad_token_id=0,
                                                  bos_token_id=1, eos_token_id=2))
        student, teacher = cohere(0, 3.0), cohere(1, 0.5)
        off = dict(logit_scale=1.0)
    batch = H.collate(H.examples(2))
    tr = _trainer(tmp_path, student, teacher, divergence="forward_kl", temperature=1.5, ce_weight=0.25)
    loss = tr.compute_loss(student, batch)
    want = _eager(student, _teacher_logits(teacher, batch), batch, "forward_kl", 0.0, 1.5, 1.0, 0.25)
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-5, atol=1e-6)
    for m in (student, teacher):
        for k, v in off.items():
            setattr(m.config, k, v)
            if hasattr(m, k):  # Cohere copies logit_scale from its config at construction
                setattr(m, k, v)
    plain = tr.compute_loss(student, batch)
    torch.testing.assert_close(plain.detach(), _eager(student, _teacher_logits(teacher, batch), batch, "forward_kl",
                                                      0.0, 1.5, 1.0, 0.25).detach(), rtol=1e-5, atol=1e-6)
    plain, loss = float(plain.detach()), float(loss.detach())
    assert abs(plain - loss) > 0.05 * loss, (plain, loss)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    data = H.examples(4)
    results = []
    for bs, ga in ((4, 1), (1, 4)):
        student, teacher = H.llama(seed=0), H.llama(seed=1)
        tr = _trainer(tmp_path / f"{bs}", student, teacher, data, divergence="skew_kl", alpha=0.2, ce_weight=1.0,
                      targs=dict(per_device_train_batch_size=bs, gradient_accumulation_steps=ga, max_steps=1))
        tr.train()
        results.append((_params(student), tr.state.log_history[0]))
    (p1, log1), (p4, log4) = results
    before = _params(H.llama(seed=0))
    assert any(not torch.equal(p1[n], before[n]) for n in p1)
    for n in p1:
        torch.testing.assert_close(p4[n], p1[n], rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")
    for key in ("loss", "kd_loss", "ce_loss"):
        assert math.isclose(log1[key], log4[key], rel_tol=1e-5), (key, log1, log4)
    assert math.isclose(log1["loss"], log1["kd_loss"] + log1["ce_loss"], rel_tol=1e-5)
    # the step's loss is the per-token mean over its 4 examples, as the eager step computes it
    student, teacher, batch = H.llama(seed=0), H.llama(seed=1), H.collate(data)
    t_logits = _teacher_logits(teacher, batch)
    with torch.no_grad():
        kd = _eager(student, t_logits, batch, "skew_kl", 0.2)
        both = _eager(student, t_logits, batch, "skew_kl", 0.2, ce=1.0)
    assert math.isclose(log1["kd_loss"], float(kd), rel_tol=1e-5)
    assert math.isclose(log1["loss"], float(both), rel_tol=1e-5)


def test_resume_from_checkpoint_equals_uninterrupted(tmp_path):
    data = H.examples(8)
    common = dict(divergence="reverse_kl", ce_weight=0.3)
    targs = dict(max_steps=4, optim="adamw_torch", learning_rate=1e-2)
    student, teacher = H.llama(seed=0), H.llama(seed=1)
    _trainer(tmp_path / "a", student, teacher, data, targs=targs, **common).train()
    full = _params(student)

    student, teacher = H.llama(seed=0), H.llama(seed=1)
    tr = _trainer(tmp_path / "b", student, teacher, data, **common,
                  targs=dict(targs, max_steps=2, save_strategy="steps", save_steps=2))
    tr.train()
    ckpt = tmp_path / "b" / "out" / "checkpoint-2"
    assert ckpt.is_dir()
    student, teacher = H.llama(seed=5), H.llama(seed=1)  # other initial weights: the checkpoint replaces them
    _trainer(tmp_path / "b", student, teacher, data, targs=targs, **common).train(resume_from_checkpoint=str(ckpt))
    for n, p in _params(student).items():
        torch.testing.assert_close(p, full[n], rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_peft_lora_student_trains_only_adapters(tmp_path):
    peft = pytest.importorskip("peft")
    base, teacher = H.llama(seed=0), H.llama(seed=1)
    student = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                        lora_dropout=0.0))
    before = _params(student)
    tr = _trainer(tmp_path, student, teacher, H.examples(4), divergence="jsd", ce_weight=0.5,
                  targs=dict(learning_rate=0.5))
    tr.train()
    after = _params(student)
    changed = {n for n in after if not torch.equal(after[n], before[n])}
    assert changed and all("lora_" in n for n in changed), changed
    assert {n for n in after if "lora_B" in n} <= changed
    # the adapters are in the loss: it equals the eager step of the PEFT model
    batch = H.collate(H.examples(2))
    want = _eager(student, _teacher_logits(teacher, batch), batch, "jsd", 0.5, 1.0, 1.0, 0.5)
    torch.testing.assert_close(tr.compute_loss(student, batch).detach(), want.detach(), rtol=1e-5, atol=1e-6)


def test_bf16_student_and_teacher_train(tmp_path):
    student, teacher = H.llama(seed=0).to(torch.bfloat16), H.llama(seed=1)  # the teacher is cast like the student
    tr = _trainer(tmp_path, student, teacher, H.examples(4), divergence="forward_kl", ce_weight=0.5,
                  targs=dict(bf16=True))
    before = _params(student)
    tr.train()
    assert next(tr.teacher_model.parameters()).dtype == torch.bfloat16
    logs = tr.state.log_history[0]
    assert all(math.isfinite(logs[k]) for k in ("loss", "kd_loss", "ce_loss"))
    assert any(not torch.equal(p, before[n]) for n, p in _params(student).items())
    batch = H.collate(H.examples(2))
    want = _eager(student, _teacher_logits(tr.teacher_model, batch), batch, "forward_kl", 0.0, 1.0, 1.0, 0.5)
    torch.testing.assert_close(tr.compute_loss(student, batch).float().detach(), want.detach(), rtol=3e-2, atol=3e-2)


def test_cached_topk_teacher_equals_sparse_teacher_by_hand(tmp_path):
    from tgtfast.cache import CachedTeacherDataset, TeacherCache, TeacherCollator

    student, teacher = H.llama(seed=0), H.llama(seed=1)
    base = H.examples(4)
    cache = TeacherCache.write(tmp_path / "cache", teacher, [b["input_ids"] for b in base], k=8,
                               logprob_dtype="float32", shard_size=2, batch_size=2)
    data = CachedTeacherDataset(base, cache)
    collator = TeacherCollator(cache)
    batch = collator([data[0], data[3]])
    tr = DistillationTrainer(student, H.args(tmp_path / "out", max_steps=1), collator, data, teacher_model=None,
                             divergence="jsd", beta=0.4, temperature=2.0, ce_weight=0.5)
    loss = tr.compute_loss(student, dict(batch))
    # by hand: the student's materialised logits against the cached top-k rows, coarse-grained (tail bucket)
    s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    sparse = batch["teacher"]
    coarse = reference.sparse_teacher_logprobs(sparse.logprobs[:, :-1].double(), sparse.tail, 2.0).float()
    rows = reference.sparse_divergence_rows(s, sparse.indices[:, :-1].long(), coarse, "jsd", param_a=0.4,
                                            temperature=2.0)
    target = batch["labels"][:, 1:].masked_fill(~batch["teacher_mask"][:, :-1], -100)
    valid = target != -100
    ce_rows = F.cross_entropy(s.flatten(0, 1), target.clamp_min(0).flatten(), reduction="none").view_as(valid)
    want = (torch.where(valid, rows, 0).sum() + 0.5 * torch.where(valid, ce_rows, 0).sum()) / valid.sum()
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-5, atol=1e-6)
    before = _params(student)
    tr.train()  # the teacher keys survive remove_unused_columns and the batch reaches the loss
    assert any(not torch.equal(p, before[n]) for n, p in _params(student).items())
    assert math.isfinite(tr.state.log_history[0]["kd_loss"])


def test_vocab_size_mismatch(tmp_path):
    student, big, small = H.llama(seed=0), H.llama(seed=1, vocab=H.V + 8), H.llama(seed=2, vocab=H.V - 8)
    with pytest.raises(ValueError, match=rf"{H.V} rows.*{H.V + 8}"):
        _trainer(tmp_path, student, big)
    batch = H.collate(H.examples(2, vocab=H.V - 8))
    tr = _trainer(tmp_path, student, big, vocab_mismatch="slice", divergence="forward_kl")
    want = _eager(student, _teacher_logits(big, batch)[..., :H.V], batch, "forward_kl")
    torch.testing.assert_close(tr.compute_loss(student, batch).detach(), want.detach(), rtol=1e-5, atol=1e-6)
    tr = _trainer(tmp_path, student, small, vocab_mismatch="pad", divergence="forward_kl")
    padded = F.pad(_teacher_logits(small, batch), (0, 8), value=-math.inf)
    want = _eager(student, padded, batch, "forward_kl")
    torch.testing.assert_close(tr.compute_loss(student, batch).detach(), want.detach(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="vocab_mismatch"):
        _trainer(tmp_path, student, small, vocab_mismatch="truncate")


def _tokenizer(order):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{j}": i for i, j in enumerate(order)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w1"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w1", pad_token="w0")


def test_tokenizer_mismatch_refused_unless_mapped(tmp_path):
    perm = torch.randperm(H.V, generator=torch.Generator().manual_seed(3))
    s_tok, t_tok = _tokenizer(range(H.V)), _tokenizer(perm.tolist())  # teacher id i is token w{perm[i]}
    student, teacher = H.llama(seed=0), H.llama(seed=1)
    with pytest.raises(ValueError, match="different vocabularies.*vocab_map"):
        DistillationTrainer(student, H.args(tmp_path), H.collate, processing_class=s_tok, teacher_model=teacher,
                            teacher_tokenizer=t_tok)
    DistillationTrainer(student, H.args(tmp_path), H.collate, processing_class=s_tok, teacher_model=teacher,
                        teacher_tokenizer=_tokenizer(range(H.V)))  # same vocabulary: accepted
    vocab_map = vocab_map_from_tokenizers(s_tok, t_tok)
    assert torch.equal(perm[vocab_map], torch.arange(H.V))
    tr = DistillationTrainer(student, H.args(tmp_path), H.collate, processing_class=s_tok, teacher_model=teacher,
                             teacher_tokenizer=t_tok, vocab_map=vocab_map, divergence="tvd")
    batch = H.collate(H.examples(2))
    # the teacher reads the text in its own ids and its distribution is read back in the student's
    t_batch = dict(batch, input_ids=vocab_map[batch["input_ids"]])
    want = _eager(student, _teacher_logits(teacher, t_batch)[..., vocab_map], batch, "tvd")
    torch.testing.assert_close(tr.compute_loss(student, batch).detach(), want.detach(), rtol=1e-5, atol=1e-6)


def test_clear_errors(tmp_path):
    student, teacher = H.llama(seed=0), H.llama(seed=1)
    with pytest.raises(ValueError, match="divergence must be one of"):
        _trainer(tmp_path, student, teacher, divergence="kl")
    with pytest.raises(ValueError, match="alpha"):
        _trainer(tmp_path, student, teacher, divergence="jsd", alpha=0.5)
    with pytest.raises(ValueError, match="beta"):
        _trainer(tmp_path, student, teacher, divergence="jsd", divergence_kwargs={"beta": 2.0})
    with pytest.raises(ValueError, match="temperature"):
        _trainer(tmp_path, student, teacher, temperature=0.0)

    class NoHead(type(student)):
        def get_output_embeddings(self):
            return None

    headless = H.llama(seed=2)
    headless.__class__ = NoHead
    with pytest.raises(ValueError, match="no output embeddings"):
        _trainer(tmp_path, headless, teacher)
    batch = H.collate(H.examples(2))
    tr = _trainer(tmp_path, student, teacher)
    student.model.forward = lambda **kw: {"past_key_values": None}
    with pytest.raises(ValueError, match="no last hidden states"):
        tr.compute_loss(student, batch)
    with pytest.raises(ValueError, match="no teacher"):
        _trainer(tmp_path, H.llama(seed=0), None).compute_loss(H.llama(seed=0), batch)


def test_evaluate_logs_the_eager_losses(tmp_path):
    student, teacher = H.llama(seed=0), H.llama(seed=1)
    data = H.examples(3)
    tr = _trainer(tmp_path, student, teacher, divergence="symmetric_kl", lam=0.3, ce_weight=2.0,
                  targs=dict(per_device_eval_batch_size=8))
    metrics = tr.evaluate(data)
    batch = H.collate(data)
    t_logits = _teacher_logits(teacher, batch)
    with torch.no_grad():
        kd = _eager(student, t_logits, batch, "symmetric_kl", 0.3)
        both = _eager(student, t_logits, batch, "symmetric_kl", 0.3, ce=2.0)
    assert math.isclose(metrics["eval_kd_loss"], float(kd), rel_tol=1e-5)
    assert math.isclose(metrics["eval_loss"], float(both), rel_tol=1e-5)
    assert math.isclose(metrics["eval_loss"], metrics["eval_kd_loss"] + 2 * metrics["eval_ce_loss"], rel_tol=1e-5)


def test_taid_schedule_moves_t_and_survives_resume(tmp_path):
    from tgtfast import TAIDSchedule

    data = H.examples(8)
    targs = dict(max_steps=4, optim="adamw_torch", learning_rate=1e-2, logging_steps=1)
    sched = dict(total_steps=4, t_start=0.2, t_end=0.9, alpha=0.3, beta=0.5)
    student, teacher = H.llama(seed=0), H.llama(seed=1)
    tr = _trainer(tmp_path / "a", student, teacher, data, targs=targs, divergence="taid",
                  taid_schedule=TAIDSchedule(**sched))
    assert tr.divergence_params["t"] == pytest.approx(0.2)
    tr.train()
    # the logged per-step divergence is the loss the schedule took: replay it by hand
    losses = [e["kd_loss"] for e in tr.state.log_history if "kd_loss" in e]
    assert len(losses) == 4
    replay = TAIDSchedule(**sched)
    for j in losses:
        replay.step(j)
    assert tr.taid_schedule.t == pytest.approx(replay.t, rel=1e-6) and tr.divergence_params["t"] == tr.taid_schedule.t
    assert 0.2 < tr.taid_schedule.t <= 0.9
    full, t_full = _params(student), tr.taid_schedule.t

    student, teacher = H.llama(seed=0), H.llama(seed=1)
    _trainer(tmp_path / "b", student, teacher, data, divergence="taid", taid_schedule=TAIDSchedule(**sched),
             targs=dict(targs, max_steps=2, save_strategy="steps", save_steps=2)).train()
    ckpt = tmp_path / "b" / "out" / "checkpoint-2"
    assert (ckpt / "taid_schedule.json").is_file()
    student, teacher = H.llama(seed=0), H.llama(seed=1)
    resumed = _trainer(tmp_path / "b", student, teacher, data, targs=targs, divergence="taid",
                       taid_schedule=TAIDSchedule(**sched))
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.taid_schedule.t == pytest.approx(t_full, rel=1e-6)
    for n, p in _params(student).items():
        torch.testing.assert_close(p, full[n], rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")

    with pytest.raises(ValueError, match="needs divergence='taid'"):
        _trainer(tmp_path, student, teacher, data, divergence="jsd", taid_schedule=TAIDSchedule(**sched))
    with pytest.raises(ValueError, match="both directly and by taid_schedule"):
        _trainer(tmp_path, student, teacher, data, divergence="taid", t=0.5, taid_schedule=TAIDSchedule(**sched))
