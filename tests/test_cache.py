"""The teacher cache (tgtfast.cache): the top-k rows against a dense teacher, resumption after a crash (no row lost
or duplicated), reading while writing, checksums and bad rows, manifest mismatches, the dataset and collator
feeding tgtfast.distill_loss, and the ``tgtfast cache-teacher`` command end to end with a tiny GPT-2."""

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import tgtfast
from tgtfast import reference as R
from tgtfast.cache import (
    CachedTeacherDataset,
    CacheError,
    NotCachedError,
    TeacherCache,
    TeacherCacheWriter,
    TeacherCollator,
    topk_logprobs,
)
from tgtfast.cache import manifest as M

HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None and importlib.util.find_spec(
    "tokenizers") is not None
V, K = 40, 6


class DenseTeacher:
    """A causal teacher whose logits at position t depend on tokens t and t - 1 only (exact whatever the batching
    and the padding). ``fail_at``: raise on that call."""

    def __init__(self, vocab=V, fail_at=None, seed=0, on_call=None):
        g = torch.Generator().manual_seed(seed)
        self.cur = torch.randn(vocab, vocab, generator=g) * 2
        self.prev = torch.randn(vocab, vocab, generator=g)
        self.calls, self.fail_at, self.on_call, self.seen = 0, fail_at, on_call, []

    def logits(self, ids):
        ids = torch.as_tensor(ids, dtype=torch.int64).reshape(1, -1)
        return self(ids)[0]

    def __call__(self, input_ids, attention_mask=None):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise RuntimeError("teacher crashed")
        if self.on_call is not None:
            self.on_call(self)
        prev = torch.cat([input_ids[:, :1] * 0, input_ids[:, :-1]], 1)
        return self.cur[input_ids] + self.prev[prev]


def make_data(n=23, seed=1, vocab=V, empty=(4,), masks=True):
    """Token sequences of 0..15 tokens, some dicts with an attention mask (left padding) and a loss mask."""
    g = np.random.default_rng(seed)
    data = []
    for i in range(n):
        ids = g.integers(0, vocab, size=int(g.integers(1, 16))).tolist()
        if i in empty:
            ids = []
        if masks and i % 3 == 1 and len(ids) > 2:
            attn = [0] + [1] * (len(ids) - 1)
            loss = [int(x) for x in g.integers(0, 2, size=len(ids))]
            data.append({"input_ids": torch.tensor(ids), "attention_mask": attn, "loss_mask": loss})
        else:
            data.append(ids)
    return data


def stored_positions(item):
    if isinstance(item, dict):
        keep = np.asarray(item["attention_mask"]) != 0
        keep &= np.asarray(item["loss_mask"]) != 0
        return np.flatnonzero(keep)
    return np.arange(len(item))


def ids_of(item):
    return item["input_ids"] if isinstance(item, dict) else item


def assert_matches_teacher(cache, data, teacher, *, exact=True, atol=1e-6):
    """Every example's rows are torch.topk of the teacher's log_softmax (float32) at its stored positions."""
    for i, item in enumerate(data):
        pos, idx, lp = cache.example(i)
        want = stored_positions(item)
        assert pos.tolist() == want.tolist(), i
        if not len(want):
            assert idx.shape == (0, cache.k) and lp.shape == (0, cache.k)
            continue
        full = torch.log_softmax(teacher.logits(ids_of(item)).float(), -1)[torch.as_tensor(want)]
        ref = torch.topk(full, cache.k, -1)
        assert idx.dtype == torch.int32
        if exact:
            assert torch.equal(idx.long(), ref.indices), i
        torch.testing.assert_close(lp.float(), ref.values, atol=atol, rtol=0)
        torch.testing.assert_close(lp.float(), full.gather(1, idx.long()), atol=atol, rtol=0)


def all_rows(cache):
    return [tuple(t.clone() for t in cache.example(i)) for i in range(cache.num_examples)]


def assert_same_rows(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        for u, v in zip(x, y):
            assert torch.equal(u, v), i


# ----------------------------------------------------------------------------------------------- writing


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip_against_a_dense_teacher(tmp_path, dtype):
    data, teacher = make_data(), DenseTeacher()
    out = tmp_path / "c"
    m = TeacherCacheWriter(out, k=K, logprob_dtype=dtype, shard_size=5, batch_size=3, teacher_id="dense").write(
        teacher, data)
    assert m["complete"] and m["k"] == K and m["vocab_size"] == V and m["logprob_dtype"] == dtype
    assert m["temperature"] == 1.0 and m["tail"] == "bucket" and m["teacher"]["id"] == "dense"
    assert m["num_shards"] == 5 and [e["shard"] for e in m["shards"]] == list(range(5))
    assert m["rows"] == sum(len(stored_positions(x)) for x in data) and m["examples_covered"] == len(data)
    assert m["ranks"] == {"0": {"shards": 5, "rows": m["rows"], "examples": len(data)}}
    on_disk = json.load(open(out / "manifest.json"))
    assert on_disk == m and not any(n.startswith("manifest.rank") or ".tmp" in n for n in os.listdir(out))
    for e in m["shards"]:
        for f in e["files"].values():
            assert M.sha256_file(str(out / f["name"])) == f["sha256"] and f["name"].startswith("rank0-")
            np.load(out / f["name"], mmap_mode="r", allow_pickle=False)
    cache = TeacherCache(out, expected_vocab_size=V, expected_k=K)
    assert cache.logprob_dtype == getattr(torch, dtype) and cache.complete and len(cache) == len(data)
    assert_matches_teacher(cache, data, teacher, atol=1e-6 if dtype == "float32" else 4e-3)
    # the batching does not change the cache
    other = TeacherCache.write(tmp_path / "b1", DenseTeacher(), data, k=K, logprob_dtype=dtype, shard_size=7,
                               batch_size=1)
    assert_same_rows(all_rows(cache), all_rows(other))


def test_topk_logprobs_blocks_rows_and_temperature(monkeypatch):
    import tgtfast.cache.writer as writer

    monkeypatch.setitem(writer._BLOCK_BYTES, "cpu", 4 * 1000 * 8)  # blocks of 8 rows
    x = torch.randn(37, 1000, dtype=torch.float64)
    rows = torch.tensor([36, 0, 5, 5, 17, 2, 30, 31, 8, 9, 10, 11, 12])
    for dtype in (torch.float32, torch.bfloat16):
        for t in (1.0, 2.5):
            for r in (None, rows):
                lp, idx = topk_logprobs(x.to(dtype), 7, t, r, backend="reference")
                picked = x.to(dtype) if r is None else x.to(dtype)[r]
                ref = torch.topk(torch.log_softmax(picked.float() / t, -1), 7, -1)
                assert torch.equal(idx, ref.indices) and torch.equal(lp, ref.values)


TOPK_BACKENDS = [b for b in ("cpp",) if tgtfast.backends("sparse_topk")[b] == "available"]


@pytest.mark.parametrize("backend", TOPK_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_topk_logprobs_kernel_matches_the_reference(backend, dtype):
    g = torch.Generator().manual_seed(3)
    # distinct values (a permutation), so that the top k is unique in float32 and float64 (16-bit storage ties)
    x = (torch.stack([torch.randperm(1500, generator=g) for _ in range(21)]).double() / 150 - 5).to(dtype)
    x[4, 7] = -math.inf  # a class with no probability
    rows = torch.tensor([20, 0, 4, 4, 13])
    for k in (1, 9, 64):
        for t in (1.0, 0.7):
            for r in (None, rows):
                lp, idx = topk_logprobs(x, k, t, r, backend=backend)
                want_lp, want_idx = R.topk_logprobs((x if r is None else x[r]).double(), k, t)
                assert lp.dtype == torch.float32 and idx.dtype == torch.int64
                picked = x if r is None else x[r]
                # the same logits were picked (ties between equal ones go to the lower class id), all distinct
                assert torch.equal(picked.gather(1, idx), picked.gather(1, want_idx))
                assert (idx.sort(1).values.diff(dim=1) > 0).all()
                if dtype in (torch.float32, torch.float64):
                    assert torch.equal(idx, want_idx)
                torch.testing.assert_close(lp.double(), want_lp.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", TOPK_BACKENDS)
def test_topk_logprobs_kernel_edge_rows(backend):
    x = torch.randn(6, 50, dtype=torch.float64)
    x[1, 3] = math.nan
    x[2, 9] = math.inf
    x[3] = -math.inf
    x[4, 5:] = -math.inf  # five finite classes, k = 8: three of no probability
    lp, idx = topk_logprobs(x, 8, 1.0, backend=backend)
    assert torch.isnan(lp[1:4]).all()
    assert torch.isfinite(lp[[0, 5]]).all()
    want_lp, want_idx = R.topk_logprobs(x[4], 8)
    torch.testing.assert_close(lp[4].double(), want_lp.double())
    assert set(idx[4, :5].tolist()) == set(range(5)) and (lp[4, 5:] == -math.inf).all()
    lp, idx = topk_logprobs(x[[0]], 50, 1.0, backend=backend)  # k = V: every class, sorted
    want_lp, want_idx = R.topk_logprobs(x[[0]], 50)
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(lp, want_lp, rtol=1e-5, atol=1e-6)


def test_teacher_call_styles_and_outputs(tmp_path):
    """A one-argument callable, a (ids, mask) callable and an output object with .logits all work."""
    data, dense = make_data(9, masks=False), DenseTeacher()

    class Out:
        def __init__(self, logits):
            self.logits = logits

    runs = {
        "one": lambda ids: dense(ids),
        "two": lambda ids, mask: dense(ids),
        "object": lambda ids, attention_mask: Out(dense(ids, attention_mask)),
    }
    ref = None
    for name, fn in runs.items():
        rows = all_rows(TeacherCache.write(tmp_path / name, fn, data, k=K, shard_size=4))
        if ref is not None:
            assert_same_rows(ref, rows)
        ref = rows


def test_resume_after_a_crash_has_no_lost_or_duplicated_rows(tmp_path):
    data = make_data(31)
    straight = TeacherCache.write(tmp_path / "straight", DenseTeacher(), data, k=K, shard_size=4, batch_size=2)
    out = tmp_path / "crashed"
    crashing = DenseTeacher(fail_at=9)
    with pytest.raises(RuntimeError, match="teacher crashed"):
        TeacherCacheWriter(out, k=K, shard_size=4, batch_size=2).write(crashing, data)
    partial = TeacherCache(out)
    done = sorted(e["shard"] for e in partial.manifest["shards"])
    assert done and len(done) < partial.manifest["num_shards"] and done == list(range(len(done)))
    assert not partial.complete
    for i in range(partial.num_examples):  # what is listed reads back; the rest is not cached
        if partial.covers(i):
            assert_same_rows([partial.example(i)], [straight.example(i)])
        else:
            with pytest.raises(NotCachedError, match=f"example {i} "):
                partial.example(i)
    resumed = DenseTeacher()
    writer = TeacherCacheWriter(out, k=K, shard_size=4, batch_size=2)
    m = writer.write(resumed, data)
    assert m["complete"] and [e["shard"] for e in m["shards"]] == list(range(m["num_shards"]))
    assert writer.stats["shards"] == m["num_shards"] - len(done)  # the shards already written were skipped
    assert m["rows"] == straight.manifest["rows"]
    assert_same_rows(all_rows(TeacherCache(out)), all_rows(straight))
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "straight"))


def test_kill_between_shard_files_and_manifest(tmp_path, monkeypatch):
    """Shard files renamed into place but not listed (killed before the manifest update) are written again."""
    data = make_data(20)
    straight = TeacherCache.write(tmp_path / "straight", DenseTeacher(), data, k=K, shard_size=4)
    real = TeacherCacheWriter._write_part
    calls = []

    def dying(self, rank, part):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # like a kill: the shard's files are there, its manifest entry is not
        real(self, rank, part)

    monkeypatch.setattr(TeacherCacheWriter, "_write_part", dying)
    out = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        TeacherCacheWriter(out, k=K, shard_size=4).write(DenseTeacher(), data)
    assert (out / "rank0-shard000002.indices.npy").exists()
    assert [e["shard"] for e in TeacherCache(out).manifest["shards"]] == [0, 1]
    (out / ".rank0-shard000003.logprobs.npy.tmp-deadhost-1-abc.tmp").write_bytes(b"half a shard")
    monkeypatch.setattr(TeacherCacheWriter, "_write_part", real)
    TeacherCacheWriter(out, k=K, shard_size=4).write(DenseTeacher(), data)
    assert_same_rows(all_rows(TeacherCache(out)), all_rows(straight))


def test_sigkill_mid_run_then_resume(tmp_path):
    """A real SIGKILL of the writing process (from inside the teacher), then the command run again."""
    (tmp_path / "killteacher.py").write_text(
        "import os, signal, sys\n"
        f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
        "from test_cache import DenseTeacher, make_data\n"
        "def make():\n"
        "    kill = int(os.environ.get('KILL_AT', '0'))\n"
        "    t = DenseTeacher(on_call=lambda t: t.calls == kill and os.kill(os.getpid(), signal.SIGKILL))\n"
        "    return t, make_data(40)\n")
    cmd = [sys.executable, "-m", "tgtfast.cli", "cache-teacher", "--teacher", "killteacher:make", "--k", str(K),
           "--out", str(tmp_path / "c"), "--shard-size", "3", "--batch-size", "2", "--dtype", "float32"]
    env = dict(os.environ, OMP_NUM_THREADS="1", KILL_AT="11")
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    done = len(TeacherCache(tmp_path / "c").manifest["shards"])
    assert 0 < done < 14
    env["KILL_AT"] = "0"
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["complete"] and summary["this_process"]["shards"] == 14 - done
    cache = TeacherCache(tmp_path / "c")
    assert_matches_teacher(cache, make_data(40), DenseTeacher())
    assert not [n for n in os.listdir(tmp_path / "c") if n.startswith(".")]


def test_reading_while_writing(tmp_path):
    """Whenever the teacher runs, a reader sees exactly the shards committed so far, each complete."""
    data, out = make_data(26), tmp_path / "c"
    reference = TeacherCache.write(tmp_path / "ref", DenseTeacher(), data, k=K, shard_size=4, batch_size=2)
    seen = []
    live = {}

    def look(teacher):
        if not (out / "manifest.json").exists():
            return
        if "cache" not in live:
            live["cache"] = TeacherCache(out)
        cache = live["cache"].refresh()
        covered = [i for i in range(len(data)) if cache.covers(i)]
        for i in range(len(data)):
            if i in covered:
                assert_same_rows([cache.example(i)], [reference.example(i)])
            else:
                with pytest.raises(NotCachedError):
                    cache.example(i)
        assert len(covered) == cache.manifest["examples_covered"] and covered == list(range(len(covered)))
        seen.append(len(covered))

    TeacherCacheWriter(out, k=K, shard_size=4, batch_size=2).write(DenseTeacher(on_call=look), data)
    assert seen[0] == 0 and seen[-1] > 0 and seen == sorted(seen)
    assert live["cache"].refresh().complete


# ----------------------------------------------------------------------------------------------- bad input


def _one_shard_file(out, shard=1, kind="logprobs"):
    return out / f"rank0-shard{shard:06d}.{kind}.npy"


def test_corrupted_truncated_and_missing_shards(tmp_path):
    data = make_data(16)
    out = tmp_path / "c"
    straight = all_rows(TeacherCache.write(out, DenseTeacher(), data, k=K, shard_size=4))
    f = _one_shard_file(out)
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0x40
    f.write_bytes(bytes(raw))
    cache = TeacherCache(out)
    cache.example(0)  # other shards read fine
    with pytest.raises(CacheError, match=r"rank0-shard000001\.logprobs\.npy.*sha256"):
        cache.example(5)
    TeacherCache(out, verify=False).example(5)  # unchecked: the caller's risk
    g = _one_shard_file(out, 2, "indices")
    g.write_bytes(g.read_bytes()[:-10])
    with pytest.raises(CacheError, match=r"rank0-shard000002\.indices\.npy: \d+ bytes but manifest\.json lists"):
        TeacherCache(out).example(9)
    os.unlink(_one_shard_file(out, 3, "positions"))
    with pytest.raises(CacheError, match=r"rank0-shard000003\.positions\.npy: shard file listed .* missing"):
        TeacherCache(out).example(13)
    # the writer recomputes what is missing or truncated always, what is corrupted with verify_existing
    with pytest.warns(UserWarning, match="written again"):
        TeacherCacheWriter(out, k=K, shard_size=4).write(DenseTeacher(), data)
    with pytest.raises(CacheError, match="sha256"):
        TeacherCache(out).example(5)
    with pytest.warns(UserWarning, match=r"shard 1 is written again.*sha256"):
        TeacherCacheWriter(out, k=K, shard_size=4, verify_existing=True).write(DenseTeacher(), data)
    assert_same_rows(all_rows(TeacherCache(out).verify_all()), straight)


def test_bad_rows_name_the_file_and_the_row(tmp_path):
    data = make_data(8, masks=False, empty=())
    out = tmp_path / "c"
    TeacherCache.write(out, DenseTeacher(), data, k=K, shard_size=4, logprob_dtype="float32")

    def rewrite(kind, change):
        """Change the rows of a shard file and list its new checksum: the file is sound, its rows are not."""
        path = _one_shard_file(out, 1, kind)
        arr = np.load(path, allow_pickle=False).copy()
        change(arr)
        m = json.load(open(out / "manifest.json"))
        m["shards"][1]["files"][kind] = M.write_npy(str(path), arr)
        M.write_json(str(out / "manifest.json"), m)

    def setter(index, value):
        return lambda a: a.__setitem__(index, value)

    good = {kind: np.load(_one_shard_file(out, 1, kind)) for kind in ("indices", "logprobs")}
    rewrite("indices", setter((3, 2), V + 5))
    with pytest.raises(CacheError, match=rf"rank0-shard000001\.indices\.npy row 3: class id {V + 5} outside"):
        TeacherCache(out).example(4)
    rewrite("indices", setter(slice(None), good["indices"]))
    rewrite("logprobs", setter((2, 0), np.nan))
    with pytest.raises(CacheError, match=r"rank0-shard000001\.logprobs\.npy row 2: a NaN or positive"):
        TeacherCache(out).example(4)
    rewrite("logprobs", setter(slice(None), good["logprobs"]))
    TeacherCache(out).verify_all()
    rewrite("positions", setter(0, 99))
    with pytest.raises(CacheError, match=r"rank0-shard000001\.positions\.npy row 0: position 99 outside"):
        TeacherCache(out).example(4)


def test_manifest_mismatches_and_bad_settings(tmp_path):
    data, out = make_data(10), tmp_path / "c"
    TeacherCache.write(out, DenseTeacher(), data, k=K, shard_size=4, teacher_id="t1")
    with pytest.raises(CacheError, match=f"vocabulary size is {V} but the student's is 50"):
        TeacherCache(out, expected_vocab_size=50)
    with pytest.raises(CacheError, match="temperature 1 but temperature 2 was expected"):
        TeacherCache(out, expected_temperature=2.0)
    with pytest.raises(CacheError, match=f"k = {K} classes per token but k = 8 was expected"):
        TeacherCache(out, expected_k=8)
    hot = tmp_path / "hot"
    TeacherCache.write(hot, DenseTeacher(), data, k=K, temperature=2.0)
    with pytest.raises(CacheError, match="temperature 2 but temperature 1 was expected"):
        TeacherCache(hot)
    assert TeacherCache(hot, expected_temperature=2.0).temperature == 2.0
    # resuming with other settings names each difference, and changes nothing
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    with pytest.raises(CacheError, match=r"k: 6 in the cache, 8 asked for.*logprob_dtype: 'float16' in the cache, "
                                         r"'float32' asked for"):
        TeacherCacheWriter(out, k=8, shard_size=4, teacher_id="t1", logprob_dtype="float32").write(
            DenseTeacher(), data)
    with pytest.raises(CacheError, match="teacher: .*'t1'.*'t2'"):
        TeacherCacheWriter(out, k=K, shard_size=4, teacher_id="t2").write(DenseTeacher(), data)
    with pytest.raises(CacheError, match="num_examples: 10 in the cache, 9 asked for"):
        TeacherCacheWriter(out, k=K, shard_size=4, teacher_id="t1").write(DenseTeacher(), data[:9])
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    # k > V: refused before anything is written
    with pytest.raises(ValueError, match=f"k = {V + 1} exceeds the teacher's vocabulary size V = {V}"):
        TeacherCacheWriter(tmp_path / "big", k=V + 1).write(DenseTeacher(), data)
    assert not (tmp_path / "big" / "manifest.json").exists()
    with pytest.raises(ValueError, match="exceeds"):  # overwrite deletes nothing before the settings are checked
        TeacherCacheWriter(out, k=V + 1, overwrite=True).write(DenseTeacher(), data)
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    (out / "notes.txt").write_text("the user's")
    TeacherCacheWriter(out, k=3, shard_size=4, overwrite=True).write(DenseTeacher(), data)
    assert TeacherCache(out).k == 3 and (out / "notes.txt").read_text() == "the user's"
    with pytest.raises(ValueError, match="k = 9 exceeds"):
        TeacherCacheWriter(tmp_path / "big", k=9, vocab_size=8)
    with pytest.raises(ValueError, match="logprob_dtype must be float16 or float32"):
        TeacherCacheWriter(tmp_path / "x", k=2, logprob_dtype="bfloat16")
    # a broken or foreign manifest, or no cache at all
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(CacheError, match=r"bad.manifest\.json: not valid JSON"):
        TeacherCache(tmp_path / "bad")
    (tmp_path / "bad" / "manifest.json").write_text(json.dumps({"format": "something"}))
    with pytest.raises(CacheError, match="not a tgtfast teacher cache manifest"):
        TeacherCache(tmp_path / "bad")
    with pytest.raises(CacheError, match="does not exist"):
        TeacherCache(tmp_path)
    m = json.load(open(out / "manifest.json"))
    m["shards"][0]["files"]["indices"]["name"] = "../../etc/passwd"
    (tmp_path / "bad" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheError, match="bad indices file entry"):
        TeacherCache(tmp_path / "bad")


def test_bad_teacher_outputs_and_examples(tmp_path):
    data = make_data(6, masks=False, empty=())
    dense = DenseTeacher()

    def nan_teacher(ids, attention_mask):
        out = dense(ids)
        out[0, 1] = float("nan")
        return out

    with pytest.raises(ValueError, match="position 1: the teacher's logits are NaN"):
        TeacherCache.write(tmp_path / "a", nan_teacher, data, k=K)
    with pytest.raises(ValueError, match="returned logits of shape"):
        TeacherCache.write(tmp_path / "b", lambda ids: dense(ids)[:, :-1], data, k=K, vocab_size=V)
    with pytest.raises(ValueError, match="returned 39 classes"):
        TeacherCache.write(tmp_path / "c", lambda ids: dense(ids)[..., :-1], data, k=K, vocab_size=V)
    with pytest.raises(ValueError, match="example 1: input_ids must be one sequence"):
        TeacherCache.write(tmp_path / "d", dense, [[1, 2], [[1, 2], [3, 4]]], k=K)
    with pytest.raises(ValueError, match="example 0: loss_mask has 1 entries for 2 tokens"):
        TeacherCache.write(tmp_path / "e", dense, [{"input_ids": [1, 2], "loss_mask": [1]}], k=K)


# ----------------------------------------------------------------------------------------------- reading


def student_data(n=14, seed=3):
    g = np.random.default_rng(seed)
    items = []
    for i in range(n):
        ids = g.integers(0, V, size=int(g.integers(2, 12)))
        labels = ids.copy()
        labels[: int(g.integers(0, 3))] = -100  # a prompt
        items.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)})
    return items


def test_collator_joins_the_cache_to_student_batches(tmp_path):
    items = student_data()
    writer_items = [{"input_ids": it["input_ids"], "loss_mask": (it["labels"] != -100).long()} for it in items]
    cache = TeacherCache.write(tmp_path / "c", DenseTeacher(), writer_items, k=K, shard_size=4,
                               logprob_dtype="float32")
    ds = CachedTeacherDataset(items, cache)
    collate = TeacherCollator(cache)
    loader = torch.utils.data.DataLoader(ds, batch_size=5, collate_fn=collate, num_workers=1)
    seen = 0
    for batch in loader:
        teacher, labels = batch["teacher"], batch["labels"]
        b, length = batch["input_ids"].shape
        assert teacher.shape == (b, length) and teacher.k == K and labels.shape == (b, length)
        assert teacher.indices.dtype == torch.int32 and teacher.logprobs.dtype == torch.float32
        for r in range(b):
            i = seen + r
            n = len(items[i]["input_ids"])
            pos, idx, lp = cache.example(i)
            assert torch.equal(batch["input_ids"][r, :n], items[i]["input_ids"])
            assert torch.equal(batch["attention_mask"][r], (torch.arange(length) < n).long())
            assert torch.equal(teacher.indices[r, pos], idx) and torch.equal(teacher.logprobs[r, pos], lp)
            mask = torch.zeros(length, dtype=torch.bool)
            mask[pos] = True
            assert torch.equal(batch["teacher_mask"][r], mask)
            want = torch.full((length,), -100)
            want[pos] = items[i]["labels"][pos]
            assert torch.equal(labels[r], want)  # no cached row (prompt, padding): ignored
        student = torch.randn(b, length, V, requires_grad=True)
        loss = tgtfast.distill_loss(student, teacher, target=labels)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
        keep = labels.reshape(-1) != -100
        assert (student.grad.reshape(-1, V)[~keep] == 0).all()
        # the same loss from the cached rows alone
        from tgtfast import SparseTeacher

        rows = SparseTeacher(teacher.indices.reshape(-1, K)[keep], teacher.logprobs.reshape(-1, K)[keep])
        torch.testing.assert_close(loss, tgtfast.distill_loss(student.detach().reshape(-1, V)[keep], rows))
        seen += b
    assert seen == len(items)


def test_collator_conventions(tmp_path):
    items = student_data(6)
    cache = TeacherCache.write(tmp_path / "c", DenseTeacher(), [it["input_ids"] for it in items], k=K)
    ds = CachedTeacherDataset(items, cache)
    batch = [ds[i] for i in range(3)]
    shifted = TeacherCollator(cache, shift_labels=True, pad_to_multiple_of=8)(batch)
    assert shifted["input_ids"].shape[1] % 8 == 0
    for r, it in enumerate(batch):
        n = len(it["input_ids"])
        assert torch.equal(shifted["labels"][r, : n - 1], it["labels"][1:])
        assert (shifted["labels"][r, n - 1:] == -100).all()
    plain = TeacherCollator(K, mask_labels=False, logprob_dtype=torch.float32, tail="renormalize",
                            ignore_index=-1)(batch)
    assert plain["teacher"].tail == "renormalize" and plain["teacher"].logprobs.dtype == torch.float32
    assert torch.equal(plain["labels"][0, : len(items[0]["labels"])], items[0]["labels"])
    pad = ~plain["teacher_mask"]
    assert (plain["teacher"].indices[pad] == torch.arange(K, dtype=torch.int32)).all()
    assert torch.allclose(plain["teacher"].logprobs[pad], torch.tensor(-np.log(K + 1), dtype=torch.float32))
    # a student sequence cut after caching (read without the token check): the rows past its end are dropped
    short = [{"input_ids": it["input_ids"][:2], "labels": it["labels"][:2]} for it in items]
    cut = TeacherCollator(cache)([CachedTeacherDataset(short, cache, check_tokens=False)[i] for i in range(3)])
    assert cut["input_ids"].shape == (3, 2) and cut["teacher_mask"].all()
    assert torch.equal(cut["teacher"].indices[0], cache.example(0)[1][:2])


def test_dataset_checks_the_tokens(tmp_path):
    items = student_data(6)
    cache = TeacherCache.write(tmp_path / "c", DenseTeacher(), [it["input_ids"] for it in items], k=K)
    swapped = [items[1], items[0]] + items[2:]
    with pytest.raises(ValueError, match="example 0: its input_ids .* are not the tokens the teacher saw"):
        CachedTeacherDataset(swapped, cache)[0]
    CachedTeacherDataset(swapped, cache, check_tokens=False)[0]
    with pytest.raises(ValueError, match="the dataset has 5 examples but the cache"):
        CachedTeacherDataset(items[:5], cache)
    with pytest.raises(IndexError, match="example 6 outside"):
        cache.example(6)
    import pickle

    again = pickle.loads(pickle.dumps(cache))  # what a spawned DataLoader worker gets: the maps open again there
    assert_same_rows([again.example(5)], [cache.example(5)])


# ----------------------------------------------------------------------------------------------- the command


def _tiny_gpt2(path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    lines = ["the cat sat on the mat", "a dog ran in the park", "the bird sang a song", "cats and dogs play",
             "a cat and a bird"]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(lines, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=len(tokenizer), bos_token_id=0,
                     eos_token_id=0, pad_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer, lines


@pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="transformers and tokenizers are not installed")
def test_cli_end_to_end_with_a_tiny_gpt2(tmp_path, capsys):
    from tgtfast.cli import main

    model, tokenizer, lines = _tiny_gpt2(tmp_path / "model")
    texts = [lines[i % len(lines)] + " the" * (i % 4) for i in range(13)]
    (tmp_path / "data.txt").write_text("\n".join(texts[:7]) + "\n\n" + "\n".join(texts[7:]) + "\n")
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    v = len(tokenizer)
    base = ["cache-teacher", "--model", str(tmp_path / "model"), "--k", "5", "--batch-size", "3",
            "--shard-size", "4", "--max-length", "6"]
    assert main(base + ["--data", str(tmp_path / "data.txt"), "--out", str(tmp_path / "c")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["complete"] and summary["examples"] == 13 and summary["vocab_size"] == v
    cache = TeacherCache(tmp_path / "c", expected_vocab_size=v, expected_k=5)
    ident = cache.teacher
    assert ident["id"] == "model" and ident["model_type"] == "gpt2" and ident["class"].endswith("GPT2LMHeadModel")
    assert ident["tokenizer"]["size"] == v and len(ident["config_sha256"]) == 64
    for i, text in enumerate(texts):
        ids = tokenizer(text, truncation=True, max_length=6)["input_ids"]
        with torch.no_grad():
            full = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        pos, idx, lp = cache.example(i)
        assert pos.tolist() == list(range(len(ids)))
        torch.testing.assert_close(lp.float(), full.topk(5).values, atol=4e-3, rtol=0)
        torch.testing.assert_close(lp.float(), full.gather(1, idx.long()), atol=4e-3, rtol=0)
        assert cache.example_info(i)["token_hash"] == M.token_hash(np.array(ids))
    # the jsonl file gives the same cache; running again resumes (nothing to do)
    assert main(base + ["--data", str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "j")]) == 0
    assert_same_rows(all_rows(TeacherCache(tmp_path / "j")), all_rows(cache))
    assert main(base + ["--data", str(tmp_path / "data.txt"), "--out", str(tmp_path / "c")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["this_process"]["shards"] == 0
    # bad input: one line, exit status 2, nothing written
    bad = {
        "k = 50 exceeds": ["--k", "50", "--out", str(tmp_path / "k")],
        "is not a directory": ["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "n")],
        "--data: expected a .txt or .jsonl": ["--data", str(tmp_path / "x.csv"), "--out", str(tmp_path / "n")],
        "k: 5 in the cache, 4 asked for": ["--k", "4", "--out", str(tmp_path / "c")],
    }
    for message, extra in bad.items():
        args = base + ["--data", str(tmp_path / "data.txt")] + extra
        assert main(args) == 2, message
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after what transformers prints while loading
        assert message in err and err.startswith("tgtfast cache-teacher: error:"), err
    assert not (tmp_path / "k" / "manifest.json").exists()


def test_cli_factory_errors(tmp_path, capsys, monkeypatch):
    from tgtfast.cli import COMMANDS
    from tgtfast.cli.cache_teacher import main

    assert "cache-teacher" in COMMANDS
    monkeypatch.chdir(tmp_path)
    (tmp_path / "factories.py").write_text("def wrong():\n    return 3\n")
    assert main(["--teacher", "factories:wrong", "--k", "2", "--out", str(tmp_path / "c")]) == 2
    assert "must return (teacher, dataset)" in capsys.readouterr().err
    assert main(["--teacher", "factories:absent", "--k", "2", "--out", str(tmp_path / "c")]) == 2
    assert "no callable 'absent'" in capsys.readouterr().err
    assert main(["--teacher", "factories:wrong", "--k", "0", "--out", str(tmp_path / "c")]) == 2
    assert "--k must be >= 1" in capsys.readouterr().err
