"""A small TGT run used by tests/test_trainer.py in subprocesses (torchrun, SIGKILL + resume).

usage: python trainer_script.py OUT_DIR RESULT.pt [--kill-at STEP] [--kill-in-save STEP] [--resume] [--mode random]
       [--dropout]
Writes the student's final state_dict to RESULT.pt (rank 0). --kill-in-save STEP: SIGKILL while the checkpoint
of STEP is half written (its temporary file stays behind)."""

import argparse
import os
import signal

import torch
from torch import nn

import tgtfast

N, D, LATENT, K = 32, 6, 3, 4


def models(dropout: bool):
    torch.manual_seed(123)
    labeler = nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, K))
    encoder = nn.Linear(D, LATENT)
    decoder = nn.Sequential(nn.Linear(LATENT, 16), nn.ReLU(), nn.Linear(16, D))
    layers = [nn.Linear(D, 8), nn.ReLU()] + ([nn.Dropout(0.2)] if dropout else []) + [nn.Linear(8, K)]
    return nn.Sequential(*layers), labeler, decoder, encoder


def data():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N, D, generator=g)
    y = torch.randint(0, K, (N,), generator=g)
    y[::3] = -100  # unlabelled examples: the CE normaliser differs between micro-batches and ranks
    return x, y


def _kill_in_save(step):
    """Make torch.save write a few bytes of the checkpoint of ``step`` and SIGKILL the process."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == step and hasattr(f, "write"):
            f.write(b"half a checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real(obj, f, *args, **kwargs)

    torch.save = save


def run(out_dir, result, *, kill_at=0, resume=False, mode="random", dropout=False, steps=8, checkpoint_every=3,
        kill_in_save=0):
    if kill_in_save:
        _kill_in_save(kill_in_save)
    student, labeler, decoder, encoder = models(dropout)
    cfg = tgtfast.TGTConfig(
        exploration=mode, sigma=0.7, samples_per_example=2, explore_steps=2, batch_size=8, grad_accum_steps=2,
        max_steps=steps, lr=0.05, optimizer="adamw", lr_schedule="cosine", warmup_steps=2, seed=3,
        out_dir=str(out_dir), checkpoint_every=checkpoint_every, resume=resume, overwrite=not resume,
        log_every=1, plot=False, progress=False,
    )
    trainer = tgtfast.TGTTrainer(student, labeler, decoder=decoder, encoder=encoder, loss=tgtfast.KDLoss(temperature=2.0), config=cfg)

    def callback(tr, record):
        if kill_at and record["step"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    trainer.fit(data(), callback=callback)
    if trainer.rank == 0:
        torch.save(student.state_dict(), str(result))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("result")
    ap.add_argument("--kill-at", type=int, default=0)
    ap.add_argument("--kill-in-save", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--mode", default="random")
    ap.add_argument("--dropout", action="store_true")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--checkpoint-every", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    run(args.out_dir, args.result, kill_at=args.kill_at, resume=args.resume, mode=args.mode, dropout=args.dropout,
        steps=args.steps, checkpoint_every=args.checkpoint_every, kill_in_save=args.kill_in_save)


if __name__ == "__main__":
    main()
