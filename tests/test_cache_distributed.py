"""``tgtfast cache-teacher`` under torchrun with 2 gloo processes: each rank writes its own shards, one manifest
covers them; a run where rank 1 crashes midway is resumed by a second run without lost or duplicated rows, and
the result equals a single-process cache."""

import json
import os
import subprocess
import sys

import torch

from tgtfast.cache import TeacherCache

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from test_cache import DenseTeacher, all_rows, assert_same_rows, make_data  # noqa: E402

N, SHARD, K = 29, 3, 5

FACTORY = f"""
import os, sys
sys.path.insert(0, {HERE!r})
from test_cache import DenseTeacher, make_data


class Logged:
    \"\"\"The dataset, noting which examples this rank reads.\"\"\"

    def __init__(self, data, path):
        self.data, self.path = data, path

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        with open(self.path, "a") as fh:
            fh.write(f"{{i}}\\n")
        return self.data[i]


def make():
    rank = int(os.environ["RANK"])
    fail = int(os.environ.get("FAIL_RANK1_AT", "0"))
    teacher = DenseTeacher(fail_at=fail if rank == 1 and fail else None)
    log = os.path.join(os.environ["LOG_DIR"], f"{{os.environ['RUN']}}-rank{{rank}}.txt")
    return teacher, Logged(make_data({N}), log)
"""


def _torchrun(tmp_path, run, **env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tgtfast.cli",
           "cache-teacher", "--teacher", "distfactory:make", "--k", str(K), "--out", str(tmp_path / "cache"),
           "--shard-size", str(SHARD), "--batch-size", "2", "--dtype", "float32", "--no-progress"]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="", LOG_DIR=str(tmp_path), RUN=run, **env)
    return subprocess.run(cmd, cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=240)


def _read(tmp_path, run, rank):
    path = tmp_path / f"{run}-rank{rank}.txt"
    return {int(x) for x in path.read_text().split()} if path.exists() else set()


def test_two_processes_crash_resume_and_match_one(tmp_path):
    torch.set_num_threads(1)
    (tmp_path / "distfactory.py").write_text(FACTORY)
    single = TeacherCache.write(tmp_path / "single", DenseTeacher(), make_data(N), k=K, shard_size=SHARD,
                                batch_size=2, logprob_dtype="float32")
    shards = single.manifest["num_shards"]

    # rank 1 raises at its 4th teacher call: the shards it finished before are kept
    r = _torchrun(tmp_path, "a", FAIL_RANK1_AT="4")
    assert r.returncode != 0, r.stdout[-2000:]
    assert "teacher crashed" in r.stderr, r.stderr[-3000:]
    partial = TeacherCache(tmp_path / "cache")
    done = {e["shard"]: e["rank"] for e in partial.manifest["shards"]}
    assert all(j % 2 == rank for j, rank in done.items()) and not partial.complete
    ones = sorted(j for j, rank in done.items() if rank == 1)  # rank 1's shards before the crash, not after
    assert ones and ones == list(range(1, 2 * len(ones), 2)) and len(ones) < shards // 2, done
    for j in done:  # what is listed is complete and right
        for i in range(j * SHARD, min(N, (j + 1) * SHARD)):
            assert_same_rows([partial.example(i)], [single.example(i)])
    crashed = 2 * len(ones) + 1  # the shard rank 1 was computing
    assert max(_read(tmp_path, "a", 1)) < (crashed + 1) * SHARD

    r = _torchrun(tmp_path, "b")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["complete"] and summary["examples"] == N and summary["shards"] == shards
    done_examples = {i for j in done for i in range(j * SHARD, min(N, (j + 1) * SHARD))}
    for rank in (0, 1):  # a resumed rank reads only the examples of shards not written yet (rank 0 also probes 0)
        assert not (_read(tmp_path, "b", rank) - {0}) & done_examples

    cache = TeacherCache(tmp_path / "cache", expected_vocab_size=single.vocab_size, expected_k=K)
    m = cache.manifest
    assert m["complete"] and [e["shard"] for e in m["shards"]] == list(range(shards))
    assert [e["rank"] for e in m["shards"]] == [j % 2 for j in range(shards)]
    assert set(m["ranks"]) == {"0", "1"} and m["rows"] == single.manifest["rows"]
    assert sum(r["examples"] for r in m["ranks"].values()) == N
    names = os.listdir(tmp_path / "cache")
    assert not [n for n in names if n.startswith("manifest.rank") or n.startswith(".")], names
    assert {n.split("-")[0] for n in names if n.endswith(".npy")} == {"rank0", "rank1"}
    assert_same_rows(all_rows(cache.verify_all()), all_rows(single))
