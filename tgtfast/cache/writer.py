"""Writing a teacher cache: :class:`TeacherCacheWriter` runs a teacher over a dataset of token sequences and stores
its top-k log-probabilities per token in shards (the layout is in :mod:`tgtfast.cache.manifest`).

Per batch the teacher runs, then its logits are reduced to the top k in row blocks (``log_softmax`` in float32 at
the cache's temperature, then ``torch.topk``; 32 MiB of float32 rows at a time on the CPU, 256 MiB on a GPU, never
a float32 copy of the whole ``[B, L, V]``), on the teacher's device, for the stored positions only. Turning a finished shard into files
(concatenation, ``.npy`` writes with their sha256, fsync, rename, the manifest part) happens in a background
thread while the teacher runs on the next batches; at most one shard waits there, so memory stays bounded.

Under ``torchrun`` (``torch.distributed`` initialised) shard ``j`` is written by rank ``j % world_size``; rank 0
prepares the directory and the header, broadcasts them, and merges the ranks' manifest parts after a barrier at
the end. A resumed run skips every shard the manifest lists, whatever the number of processes of the earlier run.
"""

from __future__ import annotations

import inspect
import os
import time
import warnings
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from tgtfast import validation as V
from tgtfast.cache import manifest as M
from tgtfast.cache.manifest import CacheError

__all__ = ["TeacherCacheWriter", "topk_logprobs"]

_BLOCK_BYTES = {"cpu": 32 << 20, "cuda": 256 << 20}  # float32 rows reduced at a time


def topk_logprobs(logits: torch.Tensor, k: int, temperature: float = 1.0,
                  rows: Optional[torch.Tensor] = None, *,
                  backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(log_softmax(logits[rows].float() / temperature), k)`` of ``[N, V]`` logits (all rows when
    ``rows`` is None): float32 ``[n, k]`` log-probabilities (most probable first) and int64 ``[n, k]`` class ids.
    A row with NaN, ``+inf`` or no finite logit gets NaN values.

    On the CPU the C++ kernel does it in one sweep per row, with no copy of the input (``tgtfast.backends(
    "sparse_topk")``); elsewhere the rows are gathered block by block into one float32 buffer, which is reduced in
    place by ``torch.log_softmax`` and ``torch.topk`` (``backend="reference"`` takes that path anywhere)."""
    from tgtfast.dispatch import Backend, select
    from tgtfast.ops import sparse as _sparse_op

    chosen = select(backend, logits.device, logits.dtype, op=_sparse_op.TOPK_OP)
    if chosen is not Backend.REFERENCE:
        return _sparse_op.TOPK[chosen.value](logits.contiguous(), None if rows is None else rows.contiguous(), k,
                                             float(temperature))
    v = logits.shape[1]
    n = logits.shape[0] if rows is None else rows.shape[0]
    values = torch.empty(n, k, dtype=torch.float32, device=logits.device)
    indices = torch.empty(n, k, dtype=torch.int64, device=logits.device)
    block = max(1, _BLOCK_BYTES.get(logits.device.type, 64 << 20) // (4 * v))
    buf = torch.empty(min(block, n), v, dtype=torch.float32, device=logits.device)
    for s in range(0, n, block):
        e = min(n, s + block)
        b = buf[: e - s]
        if rows is None:
            b.copy_(logits[s:e])
        elif logits.dtype == torch.float32:
            torch.index_select(logits, 0, rows[s:e], out=b)
        else:
            b.copy_(logits.index_select(0, rows[s:e]))
        if temperature != 1.0:
            b.div_(temperature)
        torch.log_softmax(b, -1, out=b)  # in place: the row's max is taken before it is overwritten
        torch.topk(b, k, -1, out=(values[s:e], indices[s:e]))
    return values, indices


def _call_style(teacher: Callable) -> str:
    """How to pass the attention mask: ``"keyword"`` (transformers models, callables with an ``attention_mask``
    parameter or ``**kwargs``), ``"positional"`` (two positional parameters) or ``"none"``."""
    fn = teacher.forward if isinstance(teacher, torch.nn.Module) else teacher
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return "positional"
    if any(p.name == "attention_mask" or p.kind is p.VAR_KEYWORD for p in params):
        return "keyword"
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in params):
        return "positional"
    return "none"


def _logits_of(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, Mapping):
        logits = out.get("logits")
    if logits is None and isinstance(out, (tuple, list)) and out:
        logits = out[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the teacher must return logits [B, L, V] (a tensor, or an output with .logits), got "
                        f"{type(out).__name__}")
    return logits


def _output_width(teacher: Any) -> Optional[int]:
    """The vocabulary size of a transformers-style model (its output embeddings), without running it."""
    get = getattr(teacher, "get_output_embeddings", None)
    if callable(get):
        try:
            emb = get()
        except Exception:
            return None
        w = getattr(emb, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 2:
            return int(w.shape[0])
    return None


def _teacher_device(teacher: Any, device: Optional[torch.device]) -> torch.device:
    if device is not None:
        return torch.device(device)
    if isinstance(teacher, torch.nn.Module):
        for p in teacher.parameters():
            return p.device
    return torch.device("cpu")


class _Example:
    __slots__ = ("id", "ids", "keep", "attn")

    def __init__(self, i: int, item: Any, mask_key: str) -> None:
        self.id = i
        attn = keep = None
        if isinstance(item, Mapping):
            if "input_ids" not in item:
                raise ValueError(f"example {i}: a mapping example needs 'input_ids' (keys: {sorted(item)})")
            ids = item["input_ids"]
            attn = item.get("attention_mask")
            keep = item.get(mask_key)
        else:
            ids = item
        self.ids = self._vector(ids, i, "input_ids")
        if self.ids.dtype.kind not in "iu" and self.ids.size:
            raise TypeError(f"example {i}: input_ids must be integers, got dtype {self.ids.dtype}")
        self.ids = self.ids.astype(np.int64, copy=False)
        n = self.ids.shape[0]
        self.attn = np.ones(n, dtype=bool) if attn is None else self._vector(attn, i, "attention_mask") != 0
        self.keep = self.attn.copy()
        if keep is not None:
            keep = self._vector(keep, i, mask_key)
            if keep.shape[0] != n:
                raise ValueError(f"example {i}: {mask_key} has {keep.shape[0]} entries for {n} tokens")
            self.keep &= keep != 0
        if self.attn.shape[0] != n:
            raise ValueError(f"example {i}: attention_mask has {self.attn.shape[0]} entries for {n} tokens")

    @staticmethod
    def _vector(x: Any, i: int, what: str) -> np.ndarray:
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        arr = np.asarray(x)
        if arr.ndim == 2 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 1:
            raise ValueError(f"example {i}: {what} must be one sequence [L], got shape {tuple(arr.shape)}")
        return arr


class TeacherCacheWriter:
    """Run a teacher over token sequences once and store its top-k log-probabilities per token.

    ``TeacherCacheWriter(out_dir, k=64).write(teacher, dataset)`` (or :meth:`tgtfast.cache.TeacherCache.write`).

    Args:
        out_dir: the cache directory (created). If it holds a cache already, the run resumes it: the settings and
            the teacher's identity must match the manifest (a :class:`~tgtfast.cache.CacheError` lists what
            differs) and only the shards it does not list are computed.
        k: classes kept per token, ``1 <= k <= V``.
        logprob_dtype: ``"float16"`` (default) or ``"float32"`` (or the torch / numpy dtype) of the stored
            log-probabilities; class ids are int32.
        temperature: the teacher's logits are divided by it before ``log_softmax``. Keep 1.0 (the default):
            :class:`tgtfast.SparseTeacher` takes temperature-1 log-probabilities and the loss applies its own.
        teacher_id: a string naming the teacher (e.g. its checkpoint), stored in the manifest with the teacher's
            class and, for a transformers model, a hash of its config; a resumed run must give the same.
        tokenizer: optional; its class, size and a hash of its vocabulary go into the manifest.
        batch_size: examples per teacher call. Within a shard the examples are batched by length (less padding);
            the cache does not depend on the batching.
        shard_size: examples per shard (the unit of resumption: a kill loses at most the shard in progress per
            process).
        vocab_size: the teacher's output width; found from the model (or one short teacher call) when not given.
        pad_token_id: the id padding the teacher's batches (right padding, attention mask 0).
        mask_key: the key of an optional per-position mask in mapping examples (nonzero = store): positions it
            masks out are not stored, nor are those of a zero ``attention_mask``.
        device: where the batches go; default: the teacher's parameters' device, else the CPU.
        overwrite: delete an existing cache in ``out_dir`` (only the files a writer creates) instead of resuming.
        verify_existing: on resume, check the sha256 of the listed shards too (their sizes are always checked); a
            missing, truncated or corrupted shard is dropped from the manifest and computed again.
        progress: show a progress bar (rank 0).

    The dataset: a sequence (``len`` and ``[i]``) whose item ``i`` is a 1-D sequence of token ids (list, numpy
    array or tensor) or a mapping with ``input_ids`` and optionally ``attention_mask`` and ``mask_key``. The
    teacher: a transformers causal LM, or any callable mapping int64 ``input_ids [B, L]`` (and the attention mask
    ``[B, L]``, passed when it takes an ``attention_mask`` parameter or a second positional one) to logits
    ``[B, L, V]`` (or an output with ``.logits``). It runs under ``torch.inference_mode()``.
    """

    def __init__(self, out_dir: str, *, k: int, logprob_dtype: Any = "float16", temperature: float = 1.0,
                 teacher_id: Optional[str] = None, tokenizer: Any = None, batch_size: int = 8,
                 shard_size: int = 256, vocab_size: Optional[int] = None, pad_token_id: int = 0,
                 mask_key: str = "loss_mask", device: Any = None, overwrite: bool = False,
                 verify_existing: bool = False, progress: bool = False) -> None:
        if not isinstance(out_dir, (str, os.PathLike)):
            raise TypeError(f"out_dir must be a path, got {type(out_dir).__name__}")
        self.out_dir = os.fspath(out_dir)
        self.k = V.integer("k", k, low=1)
        self.logprob_dtype = self._dtype_name(logprob_dtype)
        self.temperature = V.temperature(temperature)
        if teacher_id is not None and not isinstance(teacher_id, str):
            raise TypeError(f"teacher_id must be a string, got {type(teacher_id).__name__}")
        self.teacher_id = teacher_id
        self.tokenizer = tokenizer
        self.batch_size = V.integer("batch_size", batch_size, low=1)
        self.shard_size = V.integer("shard_size", shard_size, low=1)
        self.vocab_size = None if vocab_size is None else V.integer("vocab_size", vocab_size, low=1)
        if self.vocab_size is not None and self.k > self.vocab_size:
            raise ValueError(f"k = {self.k} exceeds the teacher's vocabulary size V = {self.vocab_size}")
        self.pad_token_id = V.integer("pad_token_id", pad_token_id, low=0)
        self.mask_key = mask_key
        self.device = None if device is None else torch.device(device)
        self.overwrite = bool(overwrite)
        self.verify_existing = bool(verify_existing)
        self.progress = bool(progress)
        self.stats: Dict[str, float] = {}

    @staticmethod
    def _dtype_name(dtype: Any) -> str:
        names = {torch.float16: "float16", torch.float32: "float32"}
        if isinstance(dtype, torch.dtype):
            name = names.get(dtype)
        else:
            try:
                name = np.dtype(dtype).name
            except TypeError:
                name = None
        if name not in M.LOGPROB_DTYPES:
            raise ValueError(f"logprob_dtype must be float16 or float32, got {dtype!r}")
        return name

    # ------------------------------------------------------------------------------------------- the run

    def write(self, teacher: Callable, dataset: Sequence) -> Dict[str, Any]:
        """Run ``teacher`` over the examples of ``dataset`` not cached yet and write their shards; returns the
        final manifest (under torchrun, on every rank, after all ranks finished)."""
        if not callable(teacher):
            raise TypeError(f"teacher must be callable (a model or a function), got {type(teacher).__name__}")
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise TypeError(f"dataset must be a sequence of examples (len and [i]), got {type(dataset).__name__}")
        dist, rank, world = _distributed()
        device = _teacher_device(teacher, self.device)
        style = _call_style(teacher)
        header = self._prepare(teacher, dataset, dist, rank, world, device, style)
        self.stats = {"teacher_s": 0.0, "topk_s": 0.0, "commit_s": 0.0, "wait_s": 0.0, "tokens": 0, "rows": 0,
                      "examples": 0, "shards": 0, "calls": 0}
        done = {e["shard"] for e in header["shards"]}
        todo = [j for j in range(header["num_shards"]) if j not in done and j % world == rank]
        start = time.perf_counter()
        try:
            self._run(teacher, dataset, header, todo, rank, device, style)
        finally:
            self.stats["wall_s"] = time.perf_counter() - start
        if dist is not None:
            dist.barrier()
        final = None
        if rank == 0:
            final = M.read_manifest(self.out_dir)
            M.write_json(os.path.join(self.out_dir, M.MANIFEST), final)
            M.remove_parts(self.out_dir)
        if dist is not None:
            dist.barrier()
        return final if final is not None else M.read_manifest(self.out_dir)

    def _prepare(self, teacher, dataset, dist, rank, world, device, style) -> Dict[str, Any]:
        """Rank 0 checks or creates the manifest and tidies the directory; every rank gets the header (or rank
        0's error)."""
        payload: Any = None
        if rank == 0:
            try:
                payload = ("ok", self._prepare_rank0(teacher, dataset, device, style))
            except Exception as exc:  # reported on every rank, so none waits for the others forever
                if dist is None:
                    raise
                payload = ("error", type(exc).__name__, str(exc))
        if dist is not None:
            box = [payload]
            dist.broadcast_object_list(box, src=0)
            payload = box[0]
        if payload[0] == "error":
            kinds = {"CacheError": CacheError, "TypeError": TypeError}
            raise kinds.get(payload[1], ValueError)(payload[2])
        header = payload[1]
        if header["num_examples"] != len(dataset):
            raise ValueError(f"rank {rank}: the dataset has {len(dataset)} examples, rank 0's has "
                             f"{header['num_examples']}")
        return header

    def _vocab(self, teacher, dataset, device, style) -> int:
        width = self.vocab_size or _output_width(teacher)
        if width is None:  # one short call
            ids = next((e.ids[:4] for e in (_Example(i, dataset[i], self.mask_key) for i in range(len(dataset)))
                        if e.ids.shape[0] > 0), np.zeros(1, dtype=np.int64))
            batch = torch.as_tensor(ids, dtype=torch.int64, device=device)[None]
            width = int(self._call(teacher, batch, torch.ones_like(batch), style).shape[-1])
        if self.k > width:
            raise ValueError(f"k = {self.k} exceeds the teacher's vocabulary size V = {width}")
        return width

    def _prepare_rank0(self, teacher, dataset, device, style) -> Dict[str, Any]:
        out = self.out_dir
        if os.path.exists(out) and not os.path.isdir(out):
            raise CacheError(f"{out} exists and is not a directory")
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, M.MANIFEST)
        want = M.new_header(
            teacher=M.teacher_identity(teacher, self.teacher_id, self.tokenizer), temperature=self.temperature,
            k=self.k, vocab_size=self._vocab(teacher, dataset, device, style), logprob_dtype=self.logprob_dtype,
            num_examples=len(dataset), shard_size=self.shard_size)
        if self.overwrite:  # only once the settings are known to be usable
            for entry in os.listdir(out):
                if M.is_cache_file(entry):
                    os.unlink(os.path.join(out, entry))
        if os.path.exists(path):
            have = M.read_manifest(out)
            diff = M.mismatches(have, want)
            if diff:
                raise CacheError(f"{path} was written with other settings than this run's; resume it with the same "
                                 "settings, or write to another directory (or overwrite=True / --overwrite): "
                                 + "; ".join(diff))
            header = dict(have, shards=self._existing(have))
            header = M.merge(header, [], path)
        else:
            header = want
        M.write_json(path, header)
        M.remove_parts(out)  # merged into the manifest just written
        M.remove_leftovers(out, [f["name"] for e in header["shards"] for f in e["files"].values()])
        return header

    def _existing(self, manifest: Dict[str, Any]) -> List[Dict[str, Any]]:
        """The listed shards whose files are all there, of the listed size (and sha256 with verify_existing);
        the others are dropped to be computed again."""
        kept = []
        for e in manifest["shards"]:
            bad = None
            for f in e["files"].values():
                p = os.path.join(self.out_dir, f["name"])
                if not os.path.isfile(p):
                    bad = f"{p} is missing"
                elif os.path.getsize(p) != f["bytes"]:
                    bad = f"{p} has {os.path.getsize(p)} bytes, the manifest lists {f['bytes']}"
                elif self.verify_existing and M.sha256_file(p) != f["sha256"]:
                    bad = f"{p} does not match its sha256 in the manifest"
                if bad:
                    break
            if bad:
                warnings.warn(f"teacher cache: shard {e['shard']} is written again: {bad}", stacklevel=3)
            else:
                kept.append(e)
        return kept

    # ------------------------------------------------------------------------------------------- teacher calls

    def _call(self, teacher, ids: torch.Tensor, attn: torch.Tensor, style: str) -> torch.Tensor:
        with torch.inference_mode():
            if style == "keyword":
                out = teacher(ids, attention_mask=attn)
            elif style == "positional":
                out = teacher(ids, attn)
            else:
                out = teacher(ids)
        return _logits_of(out)

    def _run(self, teacher, dataset, header, todo: List[int], rank: int, device, style) -> None:
        bar = None
        if self.progress and rank == 0 and todo:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc="teacher cache shards", unit="shard")
        part: List[Dict[str, Any]] = []
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tgtfast-cache")
        pending: Optional[Future] = None
        try:
            for j in todo:
                lo, hi = M.shard_range(j, header["shard_size"], header["num_examples"])
                rows = self._shard_rows(teacher, dataset, lo, hi, header, device, style)
                if pending is not None:
                    t0 = time.perf_counter()
                    pending.result()
                    self.stats["wait_s"] += time.perf_counter() - t0
                pending = pool.submit(self._commit, j, rank, lo, hi, rows, part)
                if bar is not None:
                    bar.update(1)
        finally:
            if pending is not None:
                try:
                    pending.result()  # a shard finished before an error is kept
                finally:
                    pool.shutdown(wait=True)
            else:
                pool.shutdown(wait=True)
            if bar is not None:
                bar.close()

    def _shard_rows(self, teacher, dataset, lo, hi, header, device, style) -> List[Tuple]:
        """Per example of ``[lo, hi)``: (example, positions, indices, logprobs) as numpy arrays."""
        examples = [_Example(i, dataset[i], self.mask_key) for i in range(lo, hi)]
        results: Dict[int, Tuple] = {}
        todo = sorted((e for e in examples if e.ids.shape[0] > 0), key=lambda e: -e.ids.shape[0])
        for e in examples:
            if e.ids.shape[0] == 0:
                results[e.id] = self._empty(e)
        for s in range(0, len(todo), self.batch_size):
            self._batch(teacher, todo[s:s + self.batch_size], header, device, style, results)
        return [results[e.id] for e in examples]

    def _empty(self, e: _Example) -> Tuple:
        k = self.k
        return (e, np.zeros(0, np.int32), np.zeros((0, k), np.int32), np.zeros((0, k), self.logprob_dtype))

    def _batch(self, teacher, batch: List[_Example], header, device, style, results: Dict[int, Tuple]) -> None:
        length = batch[0].ids.shape[0]
        b = len(batch)
        ids = np.full((b, length), self.pad_token_id, dtype=np.int64)
        attn = np.zeros((b, length), dtype=np.int64)
        keep = np.zeros((b, length), dtype=bool)
        for r, e in enumerate(batch):
            n = e.ids.shape[0]
            ids[r, :n], attn[r, :n], keep[r, :n] = e.ids, e.attn, e.keep
        vocab = header["vocab_size"]
        if (ids < 0).any():
            r, t = np.argwhere(ids < 0)[0]
            raise ValueError(f"example {batch[r].id} position {t}: token id {ids[r, t]} is negative")
        t0 = time.perf_counter()
        ids_t = torch.from_numpy(ids).to(device)
        attn_t = torch.from_numpy(attn).to(device)
        logits = self._call(teacher, ids_t, attn_t, style)
        if logits.dim() != 3 or tuple(logits.shape[:2]) != (b, length):
            raise ValueError(f"the teacher returned logits of shape {tuple(logits.shape)} for input_ids of shape "
                             f"({b}, {length}); expected [B, L, V] = [{b}, {length}, {vocab}]")
        if logits.shape[-1] != vocab:
            raise ValueError(f"the teacher returned {logits.shape[-1]} classes for examples "
                             f"{[e.id for e in batch]}, but the cache's vocabulary size is {vocab}")
        if not logits.is_floating_point():
            raise TypeError(f"the teacher returned {logits.dtype} logits; expected floating point")
        if logits.device.type == "cuda":
            torch.cuda.synchronize(logits.device)
        t1 = time.perf_counter()
        with torch.inference_mode():
            flat = torch.from_numpy(np.flatnonzero(keep.reshape(-1))).to(logits.device)
            every = flat.shape[0] == b * length
            lp, idx = topk_logprobs(logits.reshape(b * length, vocab), self.k, header["temperature"],
                                    None if every else flat)
            nan = torch.isnan(lp[:, 0]) | torch.isinf(lp[:, 0])
            if bool(nan.any()):
                f = int(flat[int(nan.nonzero()[0, 0])])
                raise ValueError(f"example {batch[f // length].id} position {f % length}: the teacher's logits are "
                                 "NaN or infinite there (no log-probabilities to store)")
            idx_np = idx.to(torch.int32).cpu().numpy()
            lp_np = lp.to(getattr(torch, self.logprob_dtype)).cpu().numpy()
        t2 = time.perf_counter()
        self.stats["teacher_s"] += t1 - t0
        self.stats["topk_s"] += t2 - t1
        self.stats["calls"] += 1
        self.stats["tokens"] += int(keep.sum())
        counts = keep.sum(1)
        starts = np.concatenate([[0], np.cumsum(counts)])
        for r, e in enumerate(batch):
            s, t = starts[r], starts[r + 1]
            results[e.id] = (e, np.flatnonzero(keep[r]).astype(np.int32), idx_np[s:t], lp_np[s:t])

    # ------------------------------------------------------------------------------------------- commit

    def _commit(self, j: int, rank: int, lo: int, hi: int, rows: List[Tuple], part: List[Dict[str, Any]]) -> None:
        """Write shard ``j`` (files first, each fsynced and renamed) and then list it in this rank's manifest
        part (runs in the background thread)."""
        t0 = time.perf_counter()
        counts = np.array([r[1].shape[0] for r in rows], dtype=np.int64)
        first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        examples = np.stack([
            np.arange(lo, hi, dtype=np.int64), first, counts,
            np.array([r[0].ids.shape[0] for r in rows], dtype=np.int64),
            np.array([M.token_hash(r[0].ids) for r in rows], dtype=np.int64),
        ], axis=1)
        arrays = {
            "indices": np.concatenate([r[2] for r in rows]).reshape(-1, self.k),
            "logprobs": np.concatenate([r[3] for r in rows]).reshape(-1, self.k),
            "positions": np.concatenate([r[1] for r in rows]),
            "examples": examples,
        }
        names = M.shard_files(rank, j)
        files = {kind: M.write_npy(os.path.join(self.out_dir, names[kind]), arrays[kind]) for kind in M.KINDS}
        M.fsync_dir(self.out_dir)
        entry = {"shard": j, "rank": rank, "examples": [lo, hi], "rows": int(counts.sum()), "files": files}
        part.append(entry)
        self._write_part(rank, part)
        self.stats["commit_s"] += time.perf_counter() - t0
        self.stats["rows"] += int(counts.sum())
        self.stats["examples"] += hi - lo
        self.stats["shards"] += 1

    def _write_part(self, rank: int, part: List[Dict[str, Any]]) -> None:
        M.write_json(os.path.join(self.out_dir, M.part_name(rank)), {"rank": rank, "shards": part})


def _distributed() -> Tuple[Any, int, int]:
    """``(torch.distributed, rank, world size)`` when a process group is initialised, else ``(None, 0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist, dist.get_rank(), dist.get_world_size()
    return None, 0, 1
