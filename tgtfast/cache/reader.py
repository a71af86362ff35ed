"""Reading a teacher cache: :class:`TeacherCache` (one example's rows at a time, from memory-mapped shards),
:class:`CachedTeacherDataset` (a student's dataset with the cached rows of each example) and
:class:`TeacherCollator` (student batches with a :class:`tgtfast.SparseTeacher` aligned to their positions).

Only the shards the manifest lists are read, so a cache can be read while it is written (:meth:`TeacherCache.refresh`
picks up the shards committed since). Each shard is checked the first time it is opened: its files' sizes and
sha256 against the manifest, their dtypes and shapes, and its rows (class ids in ``[0, V)``, log-probabilities not
NaN and not above 0, positions inside their example); a failure is a :class:`~tgtfast.cache.CacheError` naming
the file (and the row).
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from tgtfast.cache import manifest as M
from tgtfast.cache.manifest import CacheError, NotCachedError

__all__ = ["TeacherCache", "CachedTeacherDataset", "TeacherCollator"]

_LOGPROB_SLACK = {"float16": 1e-3, "float32": 1e-6}  # a kept log-probability may round above 0 by this much


class _Shard:
    __slots__ = ("entry", "indices", "logprobs", "positions", "examples")


class TeacherCache:
    """A teacher cache written by :class:`~tgtfast.cache.TeacherCacheWriter` (or ``tgtfast cache-teacher``).

    Args:
        path: the cache directory.
        expected_vocab_size: the student's vocabulary size; the cache's must be the same.
        expected_temperature: the temperature the cached log-probabilities must have been taken at (default 1.0,
            what :class:`tgtfast.SparseTeacher` expects); ``None`` accepts any.
        expected_k: when given, the number of classes kept per token must be this.
        verify: check each shard's sha256 and rows when first opened (default). ``False`` only checks sizes,
            dtypes and shapes.

    ``cache.example(i)`` returns ``(positions, indices, logprobs)`` of example ``i``: int64 ``[n]``, int32
    ``[n, k]`` and ``[n, k]`` in the stored dtype, for its ``n`` cached positions in order. An example whose shard
    is not written (yet) raises :class:`~tgtfast.cache.NotCachedError`.
    """

    def __init__(self, path: str, *, expected_vocab_size: Optional[int] = None,
                 expected_temperature: Optional[float] = 1.0, expected_k: Optional[int] = None,
                 verify: bool = True) -> None:
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise CacheError(f"{self.path} is not a directory (a teacher cache is a directory with a manifest.json)")
        self.verify = bool(verify)
        self._expected = (expected_vocab_size, expected_temperature, expected_k)
        self._shards: Dict[int, Dict[str, Any]] = {}
        self._open: Dict[int, _Shard] = {}
        self._verified: set = set()
        self.refresh()

    # ------------------------------------------------------------------------------------------- manifest

    def refresh(self) -> "TeacherCache":
        """Read the manifest again (and the parts of a run under way): shards committed since become readable."""
        m = M.read_manifest(self.path)
        where = os.path.join(self.path, M.MANIFEST)
        vocab, temperature, k = self._expected
        if vocab is not None and m["vocab_size"] != vocab:
            raise CacheError(f"{where}: the cache's vocabulary size is {m['vocab_size']} but the student's is "
                             f"{vocab}: the teacher and the student must share the tokenizer")
        if temperature is not None and not math.isclose(m["temperature"], float(temperature), rel_tol=1e-12):
            raise CacheError(
                f"{where}: the cache stores log-probabilities at temperature {m['temperature']:g} but temperature "
                f"{float(temperature):g} was expected (pass expected_temperature=None to accept any; a "
                "TeacherCollator given the cache marks its SparseTeacher with the cache's temperature)")
        if k is not None and m["k"] != k:
            raise CacheError(f"{where}: the cache keeps k = {m['k']} classes per token but k = {k} was expected")
        old = getattr(self, "manifest", None)
        if old is not None and any(m[f] != old[f] for f in M.IDENTITY_FIELDS):
            raise CacheError(f"{where}: the cache was rewritten with other settings while open")
        shards = {e["shard"]: e for e in m["shards"]}
        for j, e in list(self._shards.items()):
            if shards.get(j, {}).get("files") != e["files"]:  # rewritten (overwrite): open it again
                self._open.pop(j, None)
                self._verified.discard(j)
        self._shards = shards
        self.manifest = m
        return self

    @property
    def k(self) -> int:
        return self.manifest["k"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    @property
    def temperature(self) -> float:
        return self.manifest["temperature"]

    @property
    def tail(self) -> str:
        return self.manifest["tail"]

    @property
    def logprob_dtype(self) -> torch.dtype:
        return getattr(torch, self.manifest["logprob_dtype"])

    @property
    def num_examples(self) -> int:
        """The examples of the dataset the cache was written from (cached or not yet)."""
        return self.manifest["num_examples"]

    @property
    def complete(self) -> bool:
        return self.manifest["complete"]

    @property
    def teacher(self) -> Dict[str, Any]:
        return self.manifest["teacher"]

    def __len__(self) -> int:
        return self.num_examples

    def __repr__(self) -> str:
        m = self.manifest
        return (f"TeacherCache({self.path!r}, k={m['k']}, vocab_size={m['vocab_size']}, examples "
                f"{m['examples_covered']}/{m['num_examples']}, rows={m['rows']}, {m['logprob_dtype']})")

    def covers(self, i: int) -> bool:
        """Whether example ``i`` is cached (its shard is listed)."""
        return 0 <= i < self.num_examples and i // self.manifest["shard_size"] in self._shards

    # ------------------------------------------------------------------------------------------- shards

    def _file(self, e: Dict[str, Any], kind: str) -> str:
        return os.path.join(self.path, e["files"][kind]["name"])

    def _check_file(self, e: Dict[str, Any], kind: str) -> str:
        path, f = self._file(e, kind), e["files"][kind]
        if not os.path.isfile(path):
            raise CacheError(f"{path}: shard file listed in {M.MANIFEST} is missing")
        size = os.path.getsize(path)
        if size != f["bytes"]:
            raise CacheError(f"{path}: {size} bytes but {M.MANIFEST} lists {f['bytes']}: the file is truncated or "
                             "was changed; delete the cache's shard files of this shard and run the writer again "
                             "(it recomputes shards whose files do not match)")
        if self.verify and M.sha256_file(path) != f["sha256"]:
            raise CacheError(f"{path}: the file does not match its sha256 in {M.MANIFEST} (corrupted); run the "
                             "writer again with verify_existing=True (--verify-existing) to recompute the shard")
        return path

    def _load(self, e: Dict[str, Any], kind: str, dtype: str, shape: Tuple[Optional[int], ...]) -> np.ndarray:
        path = self._check_file(e, kind)
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise CacheError(f"{path}: not a plain .npy array ({exc})") from None
        if arr.dtype != np.dtype(dtype) or arr.ndim != len(shape) or any(
                want is not None and have != want for have, want in zip(arr.shape, shape)):
            raise CacheError(f"{path}: holds {arr.dtype} {tuple(arr.shape)}, expected {dtype} "
                             f"{tuple('*' if s is None else s for s in shape)}")
        return arr

    def shard(self, j: int) -> _Shard:
        """The memory-mapped arrays of shard ``j`` (checked on first open)."""
        s = self._open.get(j)
        if s is not None:
            return s
        e = self._shards.get(j)
        if e is None:
            raise NotCachedError(f"shard {j} of {self.path} is not written yet")
        lo, hi = e["examples"]
        k, rows = self.k, e["rows"]
        s = _Shard()
        s.entry = e
        s.indices = self._load(e, "indices", "int32", (rows, k))
        s.logprobs = self._load(e, "logprobs", self.manifest["logprob_dtype"], (rows, k))
        s.positions = self._load(e, "positions", "int32", (rows,))
        s.examples = self._load(e, "examples", "int64", (hi - lo, len(M.EXAMPLE_COLUMNS)))
        if self.verify and j not in self._verified:
            self._check_rows(s)
            self._verified.add(j)
        self._open[j] = s
        return s

    def _check_rows(self, s: _Shard) -> None:
        e = s.entry
        lo, hi = e["examples"]
        ex = np.asarray(s.examples)
        where = self._file(e, "examples")
        counts = ex[:, 2]
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        bad = np.flatnonzero((ex[:, 0] != np.arange(lo, hi)) | (ex[:, 1] != first) | (counts < 0) | (ex[:, 3] < 0))
        if bad.size or counts.sum() != e["rows"]:
            row = int(bad[0]) if bad.size else len(ex) - 1
            raise CacheError(f"{where} row {row}: the example table is inconsistent (example id, first row, rows "
                             f"{ex[row, :3].tolist()}; {e['rows']} rows in the shard)")
        v = self.vocab_size
        block = 1 << 16
        for start in range(0, e["rows"], block):
            idx = np.asarray(s.indices[start:start + block])
            bad = np.flatnonzero(((idx < 0) | (idx >= v)).any(1))
            if bad.size:
                r = int(bad[0])
                raise CacheError(f"{self._file(e, 'indices')} row {start + r}: class id "
                                 f"{int(idx[r][(idx[r] < 0) | (idx[r] >= v)][0])} outside [0, {v})")
            lp = np.asarray(s.logprobs[start:start + block], dtype=np.float32)
            bad = np.flatnonzero((np.isnan(lp) | (lp > _LOGPROB_SLACK[self.manifest["logprob_dtype"]])).any(1))
            if bad.size:
                r = int(bad[0])
                raise CacheError(f"{self._file(e, 'logprobs')} row {start + r}: a NaN or positive log-probability")
        pos = np.asarray(s.positions)
        tokens = np.repeat(ex[:, 3], counts)
        bad = np.flatnonzero((pos < 0) | (pos >= tokens))
        if bad.size:
            r = int(bad[0])
            raise CacheError(f"{self._file(e, 'positions')} row {r}: position {int(pos[r])} outside its example of "
                             f"{int(tokens[r])} tokens")

    def verify_all(self) -> "TeacherCache":
        """Open (and, with ``verify``, check) every listed shard now."""
        for j in sorted(self._shards):
            self.shard(j)
        return self

    # ------------------------------------------------------------------------------------------- examples

    def _locate(self, i: int) -> Tuple[_Shard, int]:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"example index must be an int, got {type(i).__name__}")
        i = int(i)
        if not 0 <= i < self.num_examples:
            raise IndexError(f"example {i} outside [0, {self.num_examples}) of {self.path}")
        j = i // self.manifest["shard_size"]
        if j not in self._shards:
            raise NotCachedError(f"example {i} of {self.path} is not cached yet (its shard {j} is not written; "
                                 f"{self.manifest['examples_covered']} of {self.num_examples} examples are)")
        s = self.shard(j)
        return s, i - s.entry["examples"][0]

    def example_info(self, i: int) -> Dict[str, int]:
        """``{"tokens", "token_hash", "rows"}`` of example ``i`` as the writer saw it."""
        s, r = self._locate(i)
        line = s.examples[r]
        return {"tokens": int(line[3]), "token_hash": int(line[4]), "rows": int(line[2])}

    def example(self, i: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(positions int64 [n], indices int32 [n, k], logprobs [n, k])`` of example ``i`` (copies)."""
        s, r = self._locate(i)
        first, n = int(s.examples[r, 1]), int(s.examples[r, 2])
        sl = slice(first, first + n)
        return (torch.from_numpy(s.positions[sl].astype(np.int64)),
                torch.from_numpy(np.array(s.indices[sl])),
                torch.from_numpy(np.array(s.logprobs[sl])))

    def __getstate__(self) -> Dict[str, Any]:  # DataLoader workers map the shards again in their process
        state = dict(self.__dict__)
        state["_open"] = {}
        return state

    # ------------------------------------------------------------------------------------------- writing

    @staticmethod
    def write(path: str, teacher: Any, dataset: Sequence, *, k: int, **options: Any) -> "TeacherCache":
        """Run ``teacher`` over ``dataset`` and store its top-k log-probabilities in ``path`` (resuming a cache
        already there): :class:`~tgtfast.cache.TeacherCacheWriter` ``(path, k=k, **options).write(teacher,
        dataset)``. Returns the cache, opened."""
        from tgtfast.cache.writer import TeacherCacheWriter

        TeacherCacheWriter(path, k=k, **options).write(teacher, dataset)
        return TeacherCache(path, expected_temperature=None)


class CachedTeacherDataset(torch.utils.data.Dataset):
    """``base[i]`` with the cached teacher rows of example ``i`` added (for :class:`TeacherCollator`).

    ``base`` is the student's dataset, example ``i`` the one the cache's example ``i`` was written from: items are
    mappings with ``input_ids`` (and optionally ``labels``, ``attention_mask``) or plain token sequences. With
    ``check_tokens`` (default) each item's ``input_ids`` must be the tokens the teacher saw (same length and hash):
    a shuffled, re-tokenised or truncated dataset fails with an error naming the example. Each item is a dict
    with the base item's keys (``input_ids`` a tensor) and ``teacher_positions``, ``teacher_indices``,
    ``teacher_logprobs``."""

    def __init__(self, base: Sequence, cache: TeacherCache, *, check_tokens: bool = True) -> None:
        if not isinstance(cache, TeacherCache):
            raise TypeError(f"cache must be a TeacherCache, got {type(cache).__name__}")
        if len(base) != cache.num_examples:
            raise ValueError(f"the dataset has {len(base)} examples but the cache {cache.path} was written from "
                             f"{cache.num_examples}")
        self.base, self.cache, self.check_tokens = base, cache, bool(check_tokens)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        item = self.base[i]
        item = dict(item) if isinstance(item, dict) or hasattr(item, "keys") else {"input_ids": item}
        ids = torch.as_tensor(np.asarray(item["input_ids"]) if not isinstance(item["input_ids"], torch.Tensor)
                              else item["input_ids"]).reshape(-1)
        item["input_ids"] = ids
        positions, indices, logprobs = self.cache.example(i)
        if self.check_tokens:
            info = self.cache.example_info(i)
            arr = ids.cpu().numpy()
            if arr.shape[0] != info["tokens"] or M.token_hash(arr) != info["token_hash"]:
                raise ValueError(
                    f"example {i}: its input_ids ({arr.shape[0]} tokens) are not the tokens the teacher saw "
                    f"({info['tokens']} tokens, another hash): the dataset is not the one {self.cache.path} was "
                    "written from (shuffled, filtered or tokenised differently?); check_tokens=False skips this")
        item["teacher_positions"], item["teacher_indices"], item["teacher_logprobs"] = positions, indices, logprobs
        return item


class TeacherCollator:
    """Batches of :class:`CachedTeacherDataset` items for distillation from the cache.

    Returns a dict with ``input_ids`` ``[B, L]`` (right-padded with ``pad_token_id``), ``attention_mask``,
    ``labels`` ``[B, L]``, ``teacher_mask`` ``[B, L]`` (bool: a cached row is there) and ``teacher``, a
    :class:`tgtfast.SparseTeacher` ``[B, L, k]`` aligned with the student's logits: its row ``(b, t)`` is the
    teacher's distribution at position ``t`` (over the token after token ``t``), as the student's
    ``logits[b, t]``. So::

        loss = tgtfast.distill_loss(student(batch["input_ids"]).logits, batch["teacher"], target=batch["labels"])

    Conventions:

    * ``labels`` are the items' ``labels`` (``input_ids`` when they have none), padded with ``ignore_index``, one
      per logit row. With ``shift_labels=True`` the items' labels are taken as transformers-style labels (the
      label of position ``t`` is token ``t``) and shifted left by one, so that ``labels[b, t]`` is the target of
      ``logits[b, t]``; the last position gets ``ignore_index``.
    * Positions with no cached row (padding, positions the writer's mask left out) hold a placeholder row (classes
      ``0..k-1``, each with log-probability ``-log(k + 1)``: a valid distribution that is never used) and, with
      ``mask_labels=True`` (default), ``labels`` there are ``ignore_index``, so the loss skips them. With
      ``mask_labels=False`` labels are left alone; use ``teacher_mask`` yourself.
    * Cached rows past the end of a student sequence (one truncated after caching, read with
      ``check_tokens=False``) are dropped.
    * ``teacher.logprobs`` has the cache's dtype unless ``logprob_dtype`` is given; ``teacher.indices`` is int32.

    ``k`` is the cache's ``k``, or the :class:`TeacherCache` itself (its ``k`` and ``tail``); ``tail`` picks the
    :class:`tgtfast.SparseTeacher` convention (``"bucket"`` by default, ``"renormalize"``).
    """

    def __init__(self, k: Any, *, pad_token_id: int = 0, ignore_index: int = -100, tail: Optional[str] = None,
                 shift_labels: bool = False, mask_labels: bool = True, logprob_dtype: Optional[torch.dtype] = None,
                 pad_to_multiple_of: Optional[int] = None) -> None:
        self.temperature = 1.0  # of the cached log-probabilities (the cache's own when the cache is given)
        if isinstance(k, TeacherCache):
            tail = k.tail if tail is None else tail
            self.temperature = float(k.temperature)
            k = k.k
        tail = "bucket" if tail is None else tail
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1 (or the TeacherCache), got {k!r}")
        self.k, self.pad_token_id, self.ignore_index = k, pad_token_id, ignore_index
        self.tail, self.shift_labels, self.mask_labels = tail, bool(shift_labels), bool(mask_labels)
        self.logprob_dtype, self.pad_to_multiple_of = logprob_dtype, pad_to_multiple_of

    def __call__(self, items: List[Dict[str, Any]]) -> Dict[str, Any]:
        from tgtfast.losses.sparse import SparseTeacher

        if not items:
            raise ValueError("an empty batch")
        k, b = self.k, len(items)
        lens = [int(it["input_ids"].shape[0]) for it in items]
        length = max(lens + [1])
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        lp_dtype = self.logprob_dtype or items[0]["teacher_logprobs"].dtype
        input_ids = torch.full((b, length), self.pad_token_id, dtype=torch.int64)
        attention = torch.zeros((b, length), dtype=torch.int64)
        labels = torch.full((b, length), self.ignore_index, dtype=torch.int64)
        indices = torch.arange(k, dtype=torch.int32).expand(b, length, k).clone()
        logprobs = torch.full((b, length, k), -math.log(k + 1), dtype=lp_dtype)
        mask = torch.zeros((b, length), dtype=torch.bool)
        for r, it in enumerate(items):
            n = lens[r]
            input_ids[r, :n] = it["input_ids"]
            am = it.get("attention_mask")
            attention[r, :n] = 1 if am is None else torch.as_tensor(am).reshape(-1)[:n]
            lab = it.get("labels")
            lab = it["input_ids"] if lab is None else torch.as_tensor(lab).reshape(-1)
            if lab.shape[0] != n:
                raise ValueError(f"batch item {r}: {lab.shape[0]} labels for {n} input_ids")
            if self.shift_labels:
                labels[r, :n - 1] = lab[1:]
            else:
                labels[r, :n] = lab
            pos, keep = it["teacher_positions"], slice(None)
            if pos.numel() and int(pos[-1]) >= n:  # a student sequence shorter than the teacher's (check_tokens off)
                keep = pos < n
                pos = pos[keep]
            indices[r, pos] = it["teacher_indices"][keep].to(torch.int32)
            logprobs[r, pos] = it["teacher_logprobs"][keep].to(lp_dtype)
            mask[r, pos] = True
        if self.mask_labels:
            labels = labels.masked_fill(~mask, self.ignore_index)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "teacher_mask": mask,
                "teacher": SparseTeacher(indices, logprobs, tail=self.tail, temperature=self.temperature)}
