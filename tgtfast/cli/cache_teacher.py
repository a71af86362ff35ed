"""``tgtfast cache-teacher``: run a teacher over a dataset once and store its top-k log-probabilities per token.

``tgtfast cache-teacher --model DIR --data FILE --k 64 --out DIR [--max-length L] [--batch-size B]
[--dtype float16]`` loads a local transformers causal LM and its tokenizer from ``DIR`` (``from_pretrained`` with
``local_files_only=True``: nothing is downloaded) and tokenises ``FILE``: a ``.txt`` file (one example per
non-blank line) or a ``.jsonl`` file (one JSON object per non-blank line, with the text under ``--text-key``, or
already tokenised ``input_ids``). Example ``i`` of the cache is the ``i``-th such line: the student's dataset
must hold the same examples in the same order.

``tgtfast cache-teacher --teacher module:function --k 64 --out DIR`` calls ``function()`` of ``module`` (looked
up among the installed modules, then in the working directory), which returns ``(teacher, dataset)`` or
``(teacher, dataset, tokenizer)``: a teacher callable ``input_ids [B, L] -> logits [B, L, V]`` and a sequence of
token sequences (see :class:`tgtfast.cache.TeacherCacheWriter`). A factory runs code: name only modules you trust.

Run it again with the same arguments to resume a killed run. Under ``torchrun --nproc_per_node N`` each process
computes every N-th shard and one manifest covers them all. The output is a JSON summary (rank 0); a bad
argument, file or mismatching cache is reported in one line, with exit status 2. transformers is imported only
by this command, and only with ``--model``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, List, Optional, Sequence

__all__ = ["main"]


class UsageError(ValueError):
    """A bad argument or input file (one line on stderr, exit status 2)."""


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tgtfast cache-teacher",
                                 description="Store a teacher's top-k log-probabilities per token over a dataset.")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a local transformers causal LM directory (with its tokenizer)")
    src.add_argument("--teacher", help="module:function returning (teacher, dataset[, tokenizer])")
    ap.add_argument("--data", help="with --model: a .txt (one example per line) or .jsonl file")
    ap.add_argument("--text-key", default="text", help="with a .jsonl file: the key of the text (default: text)")
    ap.add_argument("--k", type=int, required=True, help="classes kept per token")
    ap.add_argument("--out", required=True, help="the cache directory (resumed when it holds one)")
    ap.add_argument("--max-length", type=int, default=None, help="with --model: truncate examples to L tokens")
    ap.add_argument("--batch-size", type=int, default=8, help="examples per teacher call (default 8)")
    ap.add_argument("--shard-size", type=int, default=256, help="examples per shard (default 256)")
    ap.add_argument("--dtype", default="float16", choices=("float16", "float32"),
                    help="dtype of the stored log-probabilities (default float16)")
    ap.add_argument("--model-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="with --model: the dtype the teacher runs in (default float32)")
    ap.add_argument("--temperature", type=float, default=1.0,
                    help="divide the teacher's logits by it before log_softmax (default 1: keep it, the loss "
                         "applies its own)")
    ap.add_argument("--teacher-id", default=None, help="a name for the teacher in the manifest (default: the "
                    "model directory's name, or module:function)")
    ap.add_argument("--device", default=None, help="default: cuda when available (cuda:LOCAL_RANK under torchrun)")
    ap.add_argument("--overwrite", action="store_true", help="delete a cache in --out instead of resuming it")
    ap.add_argument("--verify-existing", action="store_true",
                    help="on resume, check the sha256 of the shards already written (recompute bad ones)")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="progress bar (default: when stderr is a terminal)")
    return ap


class _Lines:
    """The examples of a .txt/.jsonl file, tokenised on access."""

    def __init__(self, path: str, tokenizer: Any, max_length: Optional[int], text_key: str) -> None:
        self.path, self.tokenizer, self.max_length, self.text_key = path, tokenizer, max_length, text_key
        self.jsonl = path.endswith(".jsonl")
        try:
            with open(path, encoding="utf-8") as fh:
                self.lines: List[str] = [line.rstrip("\n") for line in fh if line.strip()]
        except UnicodeDecodeError as exc:
            raise UsageError(f"--data: {path} is not UTF-8 text ({exc})") from None
        if self.jsonl:
            for n, line in enumerate(self.lines):
                self._record(n)

    def _record(self, n: int) -> Any:
        try:
            rec = json.loads(self.lines[n])
        except json.JSONDecodeError as exc:
            raise UsageError(f"--data: {self.path}, example {n}: not a JSON object ({exc.msg})") from None
        if not isinstance(rec, dict) or not (self.text_key in rec or "input_ids" in rec):
            raise UsageError(f"--data: {self.path}, example {n}: expected an object with {self.text_key!r} or "
                             "'input_ids'")
        return rec

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, n: int) -> List[int]:
        text = self.lines[n]
        if self.jsonl:
            rec = self._record(n)
            if "input_ids" in rec:
                ids = rec["input_ids"]
                return ids if self.max_length is None else ids[: self.max_length]
            text = rec[self.text_key]
        kw = {} if self.max_length is None else {"truncation": True, "max_length": self.max_length}
        return list(self.tokenizer(text, **kw)["input_ids"])


def _from_model(args: argparse.Namespace, device: Any):
    if not os.path.isdir(args.model):
        raise UsageError(f"--model: {args.model} is not a directory (a local transformers model directory)")
    if not args.data:
        raise UsageError("--data FILE is required with --model")
    if not (args.data.endswith(".txt") or args.data.endswith(".jsonl")):
        raise UsageError(f"--data: expected a .txt or .jsonl file, got {args.data}")
    if not os.path.isfile(args.data):
        raise UsageError(f"--data: {args.data} does not exist or is not a file")
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise UsageError(f"--model needs transformers ({exc}); install it, or use --teacher module:function") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True,
                                                     dtype=getattr(torch, args.model_dtype))
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"--model: cannot load a causal LM and its tokenizer from {args.model}: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    model.eval().to(device)
    data = _Lines(args.data, tokenizer, args.max_length, args.text_key)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    teacher_id = args.teacher_id or os.path.basename(os.path.normpath(os.path.abspath(args.model)))
    return model, data, tokenizer, teacher_id, pad


def _from_factory(args: argparse.Namespace):
    from tgtfast.cli.train import ConfigError, _resolve

    if args.data or args.max_length is not None:
        raise UsageError("--data and --max-length go with --model; a --teacher factory returns its dataset")
    try:
        fn = _resolve(args.teacher, "--teacher", os.getcwd())
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    out = fn()
    if not isinstance(out, (tuple, list)) or len(out) not in (2, 3):
        raise UsageError(f"--teacher: {args.teacher}() must return (teacher, dataset) or (teacher, dataset, "
                         f"tokenizer), got {type(out).__name__}")
    teacher, data = out[0], out[1]
    tokenizer = out[2] if len(out) == 3 else None
    return teacher, data, tokenizer, args.teacher_id or args.teacher, 0


def _run(args: argparse.Namespace) -> dict:
    import torch

    from tgtfast.cache.writer import TeacherCacheWriter
    from tgtfast.train.distributed import resolve_device, setup_distributed

    for name in ("k", "batch_size", "shard_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_length is not None and args.max_length < 1:
        raise UsageError(f"--max-length must be >= 1, got {args.max_length}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out: {args.out} exists and is not a directory")
    device = resolve_device(args.device)
    created, rank, _ = setup_distributed(None, device)
    try:
        if args.model:
            teacher, data, tokenizer, teacher_id, pad = _from_model(args, device)
        else:
            teacher, data, tokenizer, teacher_id, pad = _from_factory(args)
        progress = sys.stderr.isatty() if args.progress is None else args.progress
        writer = TeacherCacheWriter(
            args.out, k=args.k, logprob_dtype=args.dtype, temperature=args.temperature, teacher_id=teacher_id,
            tokenizer=tokenizer, batch_size=args.batch_size, shard_size=args.shard_size, pad_token_id=pad,
            device=device if args.model else None, overwrite=args.overwrite,
            verify_existing=args.verify_existing, progress=progress)
        manifest = writer.write(teacher, data)
    finally:
        if created:
            torch.distributed.destroy_process_group()
    st = writer.stats
    return {
        "out": os.path.abspath(args.out), "rank": rank, "complete": manifest["complete"],
        "examples": manifest["num_examples"], "examples_covered": manifest["examples_covered"],
        "rows": manifest["rows"], "shards": len(manifest["shards"]), "k": manifest["k"],
        "vocab_size": manifest["vocab_size"],
        "this_process": {"shards": st["shards"], "rows": st["rows"], "seconds": round(st["wall_s"], 3),
                         "teacher_seconds": round(st["teacher_s"], 3), "topk_seconds": round(st["topk_s"], 3),
                         "write_seconds": round(st["commit_s"], 3)},
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Returns the exit status: 0, or 2 after a one-line message on stderr."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        summary = _run(args)
    except (ValueError, TypeError, OSError) as exc:
        print(f"tgtfast cache-teacher: error: {exc}", file=sys.stderr)
        return 2
    if summary["rank"] == 0:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
