"""The on-disk layout of a teacher cache: file names, the JSON manifest, checksums and atomic writes.

A cache directory holds::

    manifest.json                          the header and every shard committed before the last merge
    manifest.rank<r>.json                  while a run is under way: the shards rank r has committed since
    rank<r>-shard<j>.indices.npy           int32 [rows, k]   the kept class ids, most probable first
    rank<r>-shard<j>.logprobs.npy          float16/float32 [rows, k]   their log-probabilities (temperature 1)
    rank<r>-shard<j>.positions.npy         int32 [rows]      the position (token index) of each row in its example
    rank<r>-shard<j>.examples.npy          int64 [n, 5]      per example of the shard: example id, first row,
                                                             rows, tokens, a 64-bit hash of its token ids

Shard ``j`` covers the examples ``[j * shard_size, min((j + 1) * shard_size, num_examples))``, in order, every one
of them (an example whose positions are all masked out has 0 rows); ``r`` is the rank that wrote it. The rows of
an example are consecutive and ordered by position. A row at position ``t`` is the teacher's distribution over the
token that follows token ``t`` (``logits[:, t]`` of a causal LM): the student's ``logits[:, t]`` is aligned with it.

The manifest records, besides the header, each shard's files with their size and sha256. A shard exists for a
reader only once it is listed: its files are written to temporary names, fsynced and renamed, and only then is the
rank's manifest part replaced (temporary + ``os.replace``). A run killed at any point leaves the listed shards and
the manifest intact; files of an unlisted shard are written again by the next run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np

from tgtfast.train.checkpoint import atomic_write, remove_stale_temporaries

__all__ = [
    "CacheError",
    "NotCachedError",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "KINDS",
    "shard_files",
    "new_header",
    "check_header",
    "read_manifest",
    "merge",
    "write_json",
    "write_npy",
    "sha256_file",
    "token_hash",
    "teacher_identity",
    "fsync_dir",
]

FORMAT = "tgtfast-teacher-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
KINDS = ("indices", "logprobs", "positions", "examples")
EXAMPLE_COLUMNS = ("example", "first_row", "rows", "tokens", "token_hash")
LOGPROB_DTYPES = ("float16", "float32")
TAIL_NOTE = ("logprobs holds the kept classes only; the tail mass 1 - sum(exp(logprobs)) of a row is derived from "
             "them (tgtfast.SparseTeacher(tail='bucket') keeps it as one class, tail='renormalize' drops it)")
ROW_LAYOUT = ("positions.npy int32 [rows]: the position of each row in its example; examples.npy int64 [n, 5]: "
              "example id, first row, rows, tokens, token hash, one line per example of the shard")
# Fields a resumed run must agree on, and that a reader may check against what it expects.
IDENTITY_FIELDS = ("teacher", "temperature", "k", "vocab_size", "index_dtype", "logprob_dtype", "tail",
                   "num_examples", "shard_size")
_SHARD_RE = re.compile(r"rank(\d+)-shard(\d{6,})\.(indices|logprobs|positions|examples)\.npy")
_PART_RE = re.compile(r"manifest\.rank(\d+)\.json")
_CONFIG_NOISE = ("_name_or_path", "transformers_version", "_commit_hash", "_attn_implementation",
                 "_attn_implementation_autoset", "_attn_implementation_internal")


class CacheError(ValueError):
    """A teacher cache that cannot be used as asked: a bad or mismatching manifest, a missing, truncated or
    corrupted shard file, bad rows (the message names the file and the row)."""


class NotCachedError(LookupError):
    """An example whose shard is not written (yet)."""


# ----------------------------------------------------------------------------------------------- names


def shard_files(rank: int, shard: int) -> Dict[str, str]:
    """The file names of shard ``shard`` written by ``rank``, by kind."""
    return {kind: f"rank{rank}-shard{shard:06d}.{kind}.npy" for kind in KINDS}


def part_name(rank: int) -> str:
    return f"manifest.rank{rank}.json"


def is_cache_file(name: str) -> bool:
    """Whether ``name`` is one of the files a cache writer creates (shards, manifest parts)."""
    return name == MANIFEST or bool(_SHARD_RE.fullmatch(name) or _PART_RE.fullmatch(name))


def shard_range(shard: int, shard_size: int, num_examples: int) -> Tuple[int, int]:
    return shard * shard_size, min(num_examples, (shard + 1) * shard_size)


def num_shards(num_examples: int, shard_size: int) -> int:
    return math.ceil(num_examples / shard_size) if num_examples else 0


# ----------------------------------------------------------------------------------------------- files


def fsync_dir(directory: str) -> None:
    """Make the renames in ``directory`` durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _Hashing:
    """A write-only file object that hashes what goes through it."""

    def __init__(self, fh) -> None:
        self.fh, self.sha, self.size = fh, hashlib.sha256(), 0

    def write(self, data) -> int:
        view = memoryview(data)
        self.sha.update(view)
        self.size += view.nbytes
        return self.fh.write(view)


def write_npy(path: str, array: np.ndarray) -> Dict[str, Any]:
    """Write ``array`` as ``.npy`` through a temporary name (fsynced, then renamed over ``path``); returns the
    manifest's file entry ``{"name", "bytes", "sha256"}``, hashed while writing."""
    box: Dict[str, Any] = {}

    def write(fh) -> None:
        hashing = _Hashing(fh)
        np.lib.format.write_array(hashing, np.ascontiguousarray(array), allow_pickle=False)
        box.update(bytes=hashing.size, sha256=hashing.sha.hexdigest())

    atomic_write(path, write, binary=True)
    return {"name": os.path.basename(path), **box}


def write_json(path: str, obj: Dict[str, Any]) -> None:
    """Replace ``path`` atomically with ``obj`` as JSON (temporary, fsync, ``os.replace``, directory fsync)."""
    atomic_write(path, lambda fh: fh.write(json.dumps(obj, indent=1, sort_keys=True) + "\n"))
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def sha256_file(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def token_hash(ids: np.ndarray) -> int:
    """A 64-bit hash of token ids (as int64), stored per example so a reader can tell the student's tokens from
    other ones."""
    digest = hashlib.blake2b(np.ascontiguousarray(ids, dtype="<i8").tobytes(), digest_size=8).digest()
    return int(np.frombuffer(digest, dtype="<i8")[0])


def remove_parts(directory: str) -> None:
    """Delete the manifest parts (after they were merged into the manifest)."""
    for entry in os.listdir(directory):
        if _PART_RE.fullmatch(entry):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, entry))
    fsync_dir(directory)


def remove_leftovers(directory: str, listed: Iterable[str]) -> List[str]:
    """Delete what killed runs left in ``directory``: temporaries of dead writers and shard files no manifest
    lists (a shard renamed into place just before its manifest update). Only names a writer creates are
    touched. Call it before any writer of the new run starts."""
    names = {m.group(1) for e in os.listdir(directory) for m in [re.fullmatch(r"\.(.+?)\.tmp-.*\.tmp", e)] if m}
    removed = remove_stale_temporaries(directory, sorted(n for n in names if is_cache_file(n)))
    keep = set(listed)
    for entry in os.listdir(directory):
        if _SHARD_RE.fullmatch(entry) and entry not in keep:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, entry))
                removed.append(os.path.join(directory, entry))
    return removed


# ----------------------------------------------------------------------------------------------- identity


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def teacher_identity(teacher: Any, teacher_id: Optional[str] = None, tokenizer: Any = None) -> Dict[str, Any]:
    """What names the teacher in the manifest: the user's ``teacher_id``, the teacher's class (or function), and
    for a model with a transformers-style ``config`` the model type and a hash of the config; for a tokenizer its
    class, size and a hash of its vocabulary. The weights are not hashed: ``teacher_id`` tells checkpoints of one
    architecture apart."""
    ident: Dict[str, Any] = {"id": teacher_id}
    kind = teacher if callable(teacher) and hasattr(teacher, "__qualname__") else type(teacher)
    ident["class"] = f"{getattr(kind, '__module__', '?')}.{getattr(kind, '__qualname__', type(teacher).__name__)}"
    config = getattr(teacher, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        cfg = {k: v for k, v in config.to_dict().items() if k not in _CONFIG_NOISE}
        ident["model_type"] = cfg.get("model_type")
        ident["config_sha256"] = _sha(cfg)
    if tokenizer is not None:
        tok: Dict[str, Any] = {"class": type(tokenizer).__name__}
        with contextlib.suppress(Exception):
            tok["size"] = len(tokenizer)
        with contextlib.suppress(Exception):
            tok["vocab_sha256"] = _sha(sorted(tokenizer.get_vocab().items()))
        ident["tokenizer"] = tok
    return ident


# ----------------------------------------------------------------------------------------------- the manifest


def new_header(*, teacher: Dict[str, Any], temperature: float, k: int, vocab_size: int, logprob_dtype: str,
               num_examples: int, shard_size: int) -> Dict[str, Any]:
    from tgtfast import __version__

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tgtfast_version": __version__,
        "teacher": teacher,
        "temperature": float(temperature),
        "k": int(k),
        "vocab_size": int(vocab_size),
        "index_dtype": "int32",
        "logprob_dtype": logprob_dtype,
        "tail": "bucket",
        "tail_note": TAIL_NOTE,
        "row_layout": ROW_LAYOUT,
        "example_columns": list(EXAMPLE_COLUMNS),
        "num_examples": int(num_examples),
        "shard_size": int(shard_size),
        "num_shards": num_shards(num_examples, shard_size),
        "complete": num_examples == 0,
        "shards": [],
        "ranks": {},
        "rows": 0,
        "examples_covered": 0,
    }


def _fail(where: str, what: str) -> None:
    raise CacheError(f"{where}: {what}")


def check_header(m: Any, where: str) -> Dict[str, Any]:
    """Check the manifest ``m`` read from ``where``: its format, its fields and every shard entry."""
    if not isinstance(m, dict):
        _fail(where, f"not a tgtfast teacher cache manifest (a JSON {type(m).__name__}, not an object)")
    if m.get("format") != FORMAT:
        _fail(where, f"not a tgtfast teacher cache manifest (format {m.get('format')!r}, expected {FORMAT!r})")
    if m.get("format_version") != FORMAT_VERSION:
        _fail(where, f"format version {m.get('format_version')!r}; this tgtfast reads version {FORMAT_VERSION}")
    ints = {"k": 1, "vocab_size": 1, "num_examples": 0, "shard_size": 1}
    for key, low in ints.items():
        v = m.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            _fail(where, f"{key} must be an integer >= {low}, got {v!r}")
    t = m.get("temperature")
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not (math.isfinite(t) and t > 0):
        _fail(where, f"temperature must be a positive number, got {t!r}")
    if m["k"] > m["vocab_size"]:
        _fail(where, f"k = {m['k']} exceeds the vocabulary size {m['vocab_size']}")
    if m.get("index_dtype") != "int32":
        _fail(where, f"index_dtype must be 'int32', got {m.get('index_dtype')!r}")
    if m.get("logprob_dtype") not in LOGPROB_DTYPES:
        _fail(where, f"logprob_dtype must be one of {LOGPROB_DTYPES}, got {m.get('logprob_dtype')!r}")
    if m.get("tail") not in ("bucket", "renormalize"):
        _fail(where, f"tail must be 'bucket' or 'renormalize', got {m.get('tail')!r}")
    if not isinstance(m.get("teacher"), dict):
        _fail(where, "teacher must be an object naming the teacher")
    if not isinstance(m.get("shards"), list):
        _fail(where, "shards must be a list")
    for entry in m["shards"]:
        check_shard_entry(entry, m, where)
    return m


def check_shard_entry(e: Any, m: Dict[str, Any], where: str) -> None:
    if not isinstance(e, dict) or not isinstance(e.get("shard"), int) or not isinstance(e.get("rank"), int):
        _fail(where, f"bad shard entry {e!r}")
    j, n = e["shard"], num_shards(m["num_examples"], m["shard_size"])
    if not 0 <= j < n:
        _fail(where, f"shard {j} outside the {n} shards of {m['num_examples']} examples")
    if e.get("examples") != list(shard_range(j, m["shard_size"], m["num_examples"])):
        _fail(where, f"shard {j} covers examples {e.get('examples')!r}, expected "
                     f"{list(shard_range(j, m['shard_size'], m['num_examples']))}")
    if not isinstance(e.get("rows"), int) or e["rows"] < 0:
        _fail(where, f"shard {j}: rows must be a non-negative integer, got {e.get('rows')!r}")
    files = e.get("files")
    expected = shard_files(e["rank"], j)
    if not isinstance(files, dict) or set(files) != set(KINDS):
        _fail(where, f"shard {j}: files must name {list(KINDS)}, got {files!r}")
    for kind, f in files.items():
        ok = (isinstance(f, dict) and f.get("name") == expected[kind] and isinstance(f.get("bytes"), int)
              and isinstance(f.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", f["sha256"]))
        if not ok:
            _fail(where, f"shard {j}: bad {kind} file entry {f!r} (expected name {expected[kind]!r}, bytes, sha256)")


def mismatches(a: Dict[str, Any], b: Dict[str, Any], fields: Iterable[str] = IDENTITY_FIELDS) -> List[str]:
    """``field: a vs b`` for each identity field on which two headers differ."""
    out = []
    for f in fields:
        va, vb = a.get(f), b.get(f)
        if f == "teacher":
            va, vb = ({x: v.get(x) for x in ("id", "class", "model_type", "config_sha256", "tokenizer")}
                      for v in (va or {}, vb or {}))
        if va != vb:
            out.append(f"{f}: {a.get(f)!r} in the cache, {b.get(f)!r} asked for")
    return out


def _read_json(path: str) -> Dict[str, Any]:
    try:
        with open(path) as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise CacheError(f"{path}: not valid JSON ({exc})") from None


def read_manifest(directory: str) -> Dict[str, Any]:
    """The manifest of the cache in ``directory`` with the shards of the manifest parts of a run under way merged
    in, checked (a :class:`CacheError` names the file)."""
    path = os.path.join(directory, MANIFEST)
    for _ in range(10):
        if not os.path.isfile(path):
            raise CacheError(f"{path} does not exist: {directory} is not a tgtfast teacher cache (or its writer "
                             "has not started)")
        # The parts are listed before the manifest is read: a part merged and removed meanwhile is then either in
        # the manifest read, or gone when read (and everything is read again).
        names = sorted(e for e in os.listdir(directory) if _PART_RE.fullmatch(e))
        header = check_header(_read_json(path), path)
        parts = []
        try:
            for entry in names:
                p = os.path.join(directory, entry)
                part = _read_json(p)
                if not isinstance(part, dict) or not isinstance(part.get("shards"), list):
                    raise CacheError(f"{p}: not a manifest part (an object with a 'shards' list)")
                for e in part["shards"]:
                    check_shard_entry(e, header, p)
                parts.append((p, part))
        except FileNotFoundError:  # rank 0 merged and removed a part meanwhile: read the manifest again
            continue
        return merge(header, parts, path)
    raise CacheError(f"{path}: the manifest parts kept changing while being read")


def merge(header: Dict[str, Any], parts: List[Tuple[str, Dict[str, Any]]], where: str) -> Dict[str, Any]:
    """``header`` with the shards of ``parts`` added, and its totals and per-rank entries recomputed."""
    shards: Dict[int, Dict[str, Any]] = {e["shard"]: e for e in header["shards"]}
    for p, part in parts:
        for e in part["shards"]:
            old = shards.get(e["shard"])
            if old is not None and old["files"] != e["files"]:
                raise CacheError(
                    f"{p}: shard {e['shard']} is listed twice with different files ({where} has "
                    f"{old['files']['indices']['name']}): two writers ran on one directory")
            shards[e["shard"]] = e
    out = dict(header)
    out["shards"] = [shards[j] for j in sorted(shards)]
    ranks: Dict[str, Dict[str, int]] = {}
    for e in out["shards"]:
        r = ranks.setdefault(str(e["rank"]), {"shards": 0, "rows": 0, "examples": 0})
        r["shards"] += 1
        r["rows"] += e["rows"]
        r["examples"] += e["examples"][1] - e["examples"][0]
    out["ranks"] = {r: ranks[r] for r in sorted(ranks, key=int)}
    out["rows"] = sum(e["rows"] for e in out["shards"])
    out["examples_covered"] = sum(e["examples"][1] - e["examples"][0] for e in out["shards"])
    out["complete"] = len(out["shards"]) == num_shards(out["num_examples"], out["shard_size"])
    return out
