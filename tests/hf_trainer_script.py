"""Run by tests/test_hf_trainer_distributed.py: DistillationTrainer on tiny models, one optimiser step over 4
examples; rank 0 saves the student's parameters (or gradients) as safetensors and what it logged as JSON in
OUT/MODE for each MODE of a comma-separated list (one launch, the processes' start-up paid once).

    python -m torch.distributed.run --nproc_per_node 2 tests/hf_trainer_script.py OUT ddp,fsdp2
      ddp: Trainer.train, batch 1 per process, 2 accumulation steps; fsdp2: the loss on a fully_shard student
    python tests/hf_trainer_script.py OUT one     # one process, one batch of 4
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_tiny as H  # noqa: E402

from tgtfast.integrations.transformers import DistillationTrainer  # noqa: E402

LOSS = dict(divergence="jsd", beta=0.3, temperature=2.0, ce_weight=0.5)


def models():
    return H.llama(seed=0, initializer_range=0.3), H.llama(seed=1, hidden=48, initializer_range=0.3)


def _save(out, params, record):
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().clone() for k, v in params.items()}, os.path.join(out, "params.safetensors"))
    with open(os.path.join(out, "logs.json"), "w") as fh:
        json.dump(record, fh)


def trainer_step(out: str, mode: str) -> None:
    """Trainer.train(): 2 processes x batch 1 x 2 accumulation steps (ddp) or 1 process x batch 4 (one)."""
    student, teacher = models()
    batch, accumulate = (1, 2) if mode == "ddp" else (4, 1)
    args = H.args(os.path.join(out, "run"), per_device_train_batch_size=batch, gradient_accumulation_steps=accumulate,
                  max_steps=1, ddp_backend="gloo" if mode == "ddp" else None)
    tr = DistillationTrainer(student, args, H.collate, H.examples(4), teacher_model=teacher, **LOSS)
    tr.train()
    if tr.args.process_index == 0:
        _save(out, student.state_dict(), {"logs": tr.state.log_history, "wrapped": type(tr.model_wrapped).__name__,
                                          "teacher": type(tr.teacher_model).__name__})


def fsdp2_step(out: str) -> None:
    """The trainer's loss on a student sharded by torch's fully_shard (decoder layers and root), each process
    taking 2 of the 4 examples with the step's token count; rank 0 saves the full gradients."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from tgtfast.integrations.transformers import loss_targets

    student, teacher = models()
    tr = DistillationTrainer(student, H.args(os.path.join(out, "run"), ddp_backend="gloo"), H.collate,
                             teacher_model=teacher, **LOSS)
    rank, world = dist.get_rank(), dist.get_world_size()
    for layer in student.model.layers:
        fully_shard(layer)
    fully_shard(student)
    batch = H.collate(H.examples(4))
    count = int((loss_targets(batch) != -100).sum())
    local = {k: v[2 * rank: 2 * rank + 2] for k, v in batch.items()}
    loss = tr.compute_loss(student, local, num_items_in_batch=torch.tensor(count))
    loss.backward()  # fully_shard reduce-scatters the gradients (averaged over processes; the loss is scaled for it)
    total = loss.detach().clone()
    dist.all_reduce(total)  # the processes' parts of the step's loss
    grads = {n: p.grad.full_tensor() for n, p in student.named_parameters()}
    sharded = type(student.lm_head.weight).__name__
    if rank == 0:
        _save(out, grads, {"loss": float(total) / world, "projection": sharded})


if __name__ == "__main__":
    torch.set_num_threads(1)
    for mode in sys.argv[2].split(","):
        out = os.path.join(sys.argv[1], mode)
        os.makedirs(out, exist_ok=True)
        fsdp2_step(out) if mode == "fsdp2" else trainer_step(out, mode)
