"""Ahead-of-time compilation of every Triton kernel of tgtfast.kernels for sm_80 (A100) and sm_90 (H100/H200).

No GPU is needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` runs the whole pipeline
down to ptxas. For each block configuration the launch wrappers can choose (enumerated from their selection
functions over a grid of widths) the test checks

* that the kernel compiles for both architectures with this Triton (``tl.to_tensor``, for one, is not in
  Triton 3.6, so the noise kernels did not compile there);
* the shared memory it asks for (``metadata.shared``) against the per-block limit of the architecture (sm_80:
  163 KiB, sm_90: 227 KiB): a kernel beyond it cannot launch;
* the bytes ptxas spills per thread (``ptxas -v``, run again on the PTX) against ``SPILL_BUDGET``.

The compilations run in worker subprocesses without ``TRITON_INTERPRET`` (the kernels' modules read it at import,
e.g. to choose libdevice), in parallel, once per test session. Set ``TGTFAST_AOT_TABLE=path`` to get the measured
table as JSON lines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tgtfast.kernels import divergence, mlp_chain, mlp_chain_bwd, ptloss, softmax, sparse

ARCHS = (80, 90)
# Opt-in shared memory per block: A100 163 KiB (164 KiB per SM less 1 KiB reserved), H100/H200 227 KiB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# Bytes spilled per thread (stores; loads are checked against the same figure) that we accept.
SPILL_BUDGET = 256
WIDTHS = (64, 128, 129, 256, 784, 1000, 1024)

_WORKER = r"""
import json, os, re, subprocess, sys, tempfile, importlib
os.environ["TRITON_INTERPRET"] = "0"
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
try:
    from triton.compiler import ASTSource
except ImportError:
    sys.exit(3)
try:
    from triton.backends.nvidia import compiler as nv
    try:
        PTXAS = nv.get_ptxas(90).path
    except TypeError:
        PTXAS = nv.get_ptxas().path
except Exception:
    sys.exit(3)

def parse(log):
    st = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", log))
    ld = sum(int(x) for x in re.findall(r"(\d+) bytes spill loads", log))
    regs = max([int(x) for x in re.findall(r"Used (\d+) registers", log)] or [0])
    return st, ld, regs

def spills(ptx):
    arch = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([PTXAS, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(d, "k.o")],
                             capture_output=True, text=True, check=True).stderr
    return parse(log)

def compile_capturing_ptxas_log(src, target, options):
    # TRITON_DUMP_PTXAS_LOG=1 makes Triton print the `ptxas -v` log to stdout: capture file descriptor 1
    with tempfile.TemporaryFile(mode="w+") as f:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(f.fileno(), 1)
        try:
            c = triton.compile(src, target=target, options=options)
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        f.seek(0)
        return c, f.read()

for line in sys.stdin:
    job = json.loads(line)
    mod, name = job["kernel"].rsplit(".", 1)
    fn = getattr(importlib.import_module(mod), name)
    const = {k: getattr(tl, v[3:]) if isinstance(v, str) and v.startswith("tl.") else v
             for k, v in job["const"].items()}
    sig = dict(job["sig"], **{k: "constexpr" for k in const})
    res = dict(id=job["id"])
    try:
        src = ASTSource(fn=fn, signature={k: sig[k] for k in fn.arg_names},
                        constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
        c, log = compile_capturing_ptxas_log(src, GPUTarget("cuda", job["cc"], 32),
                                             {"num_warps": job["num_warps"], "num_stages": job["num_stages"]})
        # a compilation served from Triton's cache ran no ptxas: run it on the PTX
        st, ld, regs = parse(log) if "Used" in log else spills(c.asm["ptx"])
        res.update(ok=True, shared=int(c.metadata.shared), spill_stores=st, spill_loads=ld, regs=regs)
    except Exception as e:
        res.update(ok=False, error=f"{type(e).__name__}: {e}"[-3000:])
    print(json.dumps(res), flush=True)
"""


def _const_key(const):
    return json.dumps(const, sort_keys=True)


def _chain_jobs():
    sig = {k: "*fp32" for k in ("z_ptr", "w1_ptr", "b1_ptr", "w2_ptr", "b2_ptr", "w3_ptr", "b3_ptr", "w4_ptr",
                                 "b4_ptr", "pert_ptr")}
    sig.update({"x_ptr": "*bf16", "soft_ptr": "*bf16", "sigma": "fp32", "seed": "i64", "noise_base": "i64",
                "inv_t": "fp32"})
    sig.update({k: "i32" for k in ("M", "D", "H1", "X", "H2", "K")})
    seen = {}
    for d in WIDTHS:
        for h1 in WIDTHS:
            for h2 in WIDTHS:
                for k in (10, 1000):
                    widths = [d, h1, 1000, h2, k]
                    cfg = mlp_chain.fused_launch_config(widths)
                    assert (cfg is not None) == (mlp_chain.chain_path(widths, 2) == "fused")
                    if cfg is None:
                        continue
                    cfg = dict(cfg)
                    nw, ns = cfg.pop("num_warps"), cfg.pop("num_stages")
                    const = dict(ACT1=2, ACT2=3, ACT3=4, ACT4=0, HAS_B1=True, HAS_B2=True, HAS_B3=True,
                                 HAS_B4=True, WRITE_PERT=True, PRECISION="tf32x3", **cfg)
                    seen.setdefault(_const_key([const, nw, ns]), ("mlp_chain._chain_kernel", sig, const, nw, ns))
    return list(seen.values())


def _linear_jobs():
    sig = {"x_ptr": "*fp32", "w_ptr": "*fp32", "b_ptr": "*fp32", "y_ptr": "*fp32", "out_ptr": "*bf16",
           "pert_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "sigma": "fp32", "seed": "i64",
           "noise_base": "i64", "inv_t": "fp32"}
    seen = {}
    for m in (10, 64, 1000):
        for n in WIDTHS + (10, 300, 512):
            for k in WIDTHS:
                for fuse in (False, True):
                    if fuse and n > mlp_chain._SOFTMAX_FUSED_MAX:
                        continue
                    bm, bn, bk, nw, ns = mlp_chain.linear_config(m, n, k, fuse)
                    const = dict(ACT=2, HAS_BIAS=True, NOISE=True, WRITE_PERT=True, WRITE_OUT=True, SOFTMAX=fuse,
                                 PRECISION="tf32x3", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
                    seen.setdefault(_const_key([const, nw, ns]), ("mlp_chain._linear_kernel", sig, const, nw, ns))
    bwd_sig = {"g_ptr": "*fp32", "gx_ptr": "*fp32", "pre_ptr": "*fp32", "w_ptr": "*fp32", "dx_ptr": "*fp32",
               "M": "i32", "N": "i32", "K": "i32"}
    for m in (10, 64, 1000):
        for n in WIDTHS + (10, 300):
            for k in WIDTHS:
                bm, bn, bk, nw, ns = mlp_chain_bwd.linear_bwd_config(m, n, k)
                const = dict(ACT=2, HAS_G=True, HAS_GX=True, PRECISION="tf32x3", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
                seen.setdefault(_const_key([const, nw, ns]), ("mlp_chain_bwd._linear_bwd_kernel", bwd_sig, const, nw, ns))
    jobs = list(seen.values())
    jobs.append(("mlp_chain._softmax_kernel", {"x_ptr": "*fp32", "out_ptr": "*bf16", "N": "i32", "inv_t": "fp32"},
                 dict(BLOCK=mlp_chain._ROW_SOFTMAX_BLOCK), 4, 3))
    jobs.append(("mlp_chain_bwd._softmax_bwd_kernel", {"pre_ptr": "*fp32", "g_ptr": "*fp32", "out_ptr": "*fp32",
                                                   "N": "i32", "inv_t": "fp32"},
                 dict(ACT=3, BLOCK=mlp_chain._ROW_SOFTMAX_BLOCK), 4, 3))
    jobs.append(("mlp_chain_bwd._act_kernel", {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32"},
                 dict(ACT=2, BLOCK=mlp_chain_bwd._ELEMENTWISE_BLOCK), 4, 3))
    return jobs


def _softmax_jobs():
    sig = {"x_ptr": "*fp32", "y_ptr": "*fp32", "K": "i32", "inv_t": "fp32"}
    seen = {}
    for k in WIDTHS + (10, 4096, 5000, 32000):
        block = softmax.softmax_block(k)
        const = dict(ACC="tl.float32", BLOCK=block, SINGLE=k <= block)
        seen.setdefault(_const_key(const), ("softmax._softmax_kernel", sig, const, softmax.softmax_num_warps(block), 3))
    return list(seen.values())


def _ptloss_jobs():
    sig = {"student_ptr": "*fp32", "teacher_ptr": "*fp32", "coeffs_ptr": "*fp32", "valid_ptr": "*u8",
           "loss_ptr": "*fp32", "grad_s_ptr": "*fp32", "grad_t_ptr": "*fp32", "N": "i32", "K": "i32",
           "inv_temp": "fp32", "keep": "fp32", "smooth_add": "fp32", "log_smooth": "fp32", "grad_scale": "fp32"}
    seen = {}
    for k in WIDTHS + (10, 4096, 32000):
        block_n, block_k, nw = ptloss.launch_config(1000, k)
        # the heaviest variant (per-class coefficients, smoothing, both gradients); a probability teacher at the
        # widest tile
        for teacher_logits in (True, False) if block_k == 4096 else (True,):
            const = dict(M=5, PER_CLASS=True, HAS_VALID=True, TEACHER_LOGITS=teacher_logits, SMOOTH=True,
                         NEED_GS=True, NEED_GT=True, SINGLE_TILE=k <= block_k, BLOCK_N=block_n, BLOCK_K=block_k)
            seen.setdefault(_const_key([const, nw]), ("ptloss._ptloss_kernel", sig, const, nw, 3))
    return list(seen.values())


def _divergence_jobs():
    """Every divergence (and AB form) with both gradients at the language-model widths (the single tile at 4096,
    the three-pass walk beyond, in bfloat16); the heaviest variant at the packed short-row tiles."""
    sig = {"student_ptr": "*fp32", "teacher_ptr": "*fp32", "valid_ptr": "*u8", "loss_ptr": "*fp32",
           "grad_s_ptr": "*fp32", "grad_t_ptr": "*fp32", "N": "i32", "K": "i32"}
    sig.update({k: "fp32" for k in ("s_scale", "t_scale", "w_p", "w_q", "log_w_p", "log_w_q", "ab_sum", "gs_factor",
                                    "gt_factor")})
    bf16 = dict(sig, student_ptr="*bf16", teacher_ptr="*bf16", grad_s_ptr="*bf16", grad_t_ptr="*bf16")
    ab = divergence.NAMES.index("ab_divergence")
    every = [(code, 0) for code in range(len(divergence.NAMES)) if code != ab] + [(ab, case) for case in range(5)]
    heavy = [(ab, divergence.AB_GENERAL.value)]  # the most registers of the short-row tiles
    seen = {}
    for k in WIDTHS + (10, 4096, 32000, 131072):
        block_n, block_k, nw = divergence.launch_config(k)
        for code, case in every if k >= 4096 else heavy:
            const = dict(DIV=code, AB_CASE=case, HAS_VALID=True, NEED_GS=True, NEED_GT=True,
                         SINGLE_TILE=k <= block_k, BLOCK_N=block_n, BLOCK_K=block_k)
            seen.setdefault(_const_key([const, nw]),
                            ("divergence._divergence_kernel", bf16 if k > block_k else sig, const, nw, 3))
    return list(seen.values())


def _sparse_jobs():
    """The sparse teacher's kernels (the forward's walk and gather, the backward's dense walk, the bitmap and the
    scatter of the kept classes) in bfloat16 at the language-model widths, float32 at a short row."""
    rows = {"valid_ptr": "*u8", "indices_ptr": "*i64", "N": "i32", "V": "i32", "W": "i32", "KEPT": "i32",
            "scale": "fp32"}
    pairs = {"indices_ptr": "*i64", "valid_ptr": "*u8", "total": "i64", "KEPT": "i32", "V": "i32", "W": "i32",
             "scale": "fp32"}
    jobs = []
    for k, kept, dt in ((40, 39, "fp32"), (32000, 512, "bf16"), (131072, 4096, "bf16")):
        block_n, block_k, nw = sparse.launch_config(k, words=True)
        block_j = sparse.kept_block(kept, block_n)
        const = dict(HAS_VALID=True, SINGLE_TILE=-(-k // 32) <= block_k // 32, SINGLE_KEPT=kept <= block_j,
                     BLOCK_N=block_n, BLOCK_W=block_k // 32, BLOCK_J=block_j)
        jobs.append(("sparse._coarse_kernel", dict(rows, student_ptr=f"*{dt}", bitmap_ptr="*i32", coarse_ptr="*fp32"),
                     const, nw, 3))
        block_n, block_k, nw = sparse.launch_config(k, words=False)
        const = dict(HAS_VALID=True, SINGLE_TILE=k <= block_k, BLOCK_N=block_n, BLOCK_K=block_k)
        jobs.append(("sparse._bwd_dense_kernel", dict(rows, student_ptr=f"*{dt}", coarse_ptr="*fp32",
                                                      grad_coarse_ptr="*fp32", grad_ptr=f"*{dt}"), const, nw, 3))
    const = dict(HAS_VALID=True, BLOCK=sparse.PAIR_BLOCK)
    jobs.append(("sparse._bitmap_kernel", dict(pairs, bitmap_ptr="*i32"), const, sparse._PAIR_WARPS, 3))
    jobs.append(("sparse._scatter_kernel", dict(pairs, grad_coarse_ptr="*fp32", grad_ptr="*bf16"), const,
                 sparse._PAIR_WARPS, 3))
    return jobs


def _noise_jobs():
    sig = {"z_ptr": "*bf16", "out_ptr": "*bf16", "numel": "i64", "sigma": "fp32", "seed": "i64", "offset": "i64"}
    from tgtfast.kernels import noise
    jobs = [("noise._perturb_kernel", sig, dict(HAS_Z=True, F64=False, BLOCK=noise._BLOCK), 4, 3),
            ("noise._perturb_kernel", dict(sig, z_ptr="*fp32", out_ptr="*fp32", seed="i32"),
             dict(HAS_Z=False, F64=False, BLOCK=noise._BLOCK), 4, 3)]
    # the launcher specialises a seed of 1 to a constexpr
    jobs.append(("noise._perturb_kernel", {k: v for k, v in sig.items() if k != "seed"},
                 dict(HAS_Z=True, F64=False, BLOCK=noise._BLOCK, seed=1), 4, 3))
    return jobs


def _all_jobs():
    jobs = []
    kernels = (_noise_jobs() + _softmax_jobs() + _ptloss_jobs() + _divergence_jobs() + _sparse_jobs()
               + _linear_jobs() + _chain_jobs())
    for kernel, sig, const, nw, ns in kernels:
        for cc in ARCHS:
            jobs.append(dict(id=len(jobs), kernel="tgtfast.kernels." + kernel, sig=sig, const=const, cc=cc,
                             num_warps=nw, num_stages=ns))
    return jobs


def _run_worker(jobs):
    env = dict(os.environ, TRITON_INTERPRET="0", TGTFAST_QUIET="1", TRITON_DUMP_PTXAS_LOG="1")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-c", _WORKER], input="".join(json.dumps(j) + "\n" for j in jobs),
                         capture_output=True, text=True, env=env, timeout=900)
    if out.returncode == 3:
        return None
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="session")
def aot_results():
    jobs = _all_jobs()
    n_workers = max(2, min(8, os.cpu_count() or 2))
    # most expensive (the fused chain) first, spread round-robin
    parts = [jobs[::-1][i::n_workers] for i in range(n_workers)]
    with ThreadPoolExecutor(n_workers) as pool:
        outs = list(pool.map(_run_worker, parts))
    if any(o is None for o in outs):
        pytest.skip("this Triton cannot compile for a CUDA target without a GPU (no ASTSource or no bundled ptxas)")
    by_id = {r["id"]: r for o in outs for r in o}
    assert len(by_id) == len(jobs)
    rows = [dict(job, **by_id[job["id"]]) for job in jobs]
    table = os.environ.get("TGTFAST_AOT_TABLE")
    if table:
        with open(table, "w") as f:
            for r in rows:
                f.write(json.dumps({k: v for k, v in r.items() if k != "sig"}) + "\n")
    return rows


def _describe(r):
    return f"{r['kernel'].rsplit('.', 1)[1]} sm_{r['cc']} warps={r['num_warps']} stages={r['num_stages']} {r['const']}"


def test_configurations_are_enumerated():
    """The grid reaches the interesting selections: both chain paths, the fused softmax and the row softmax, the
    divergence kernel's single tile and chunked walk."""
    chain = _chain_jobs()
    blocks = {(c["BLOCK_D"], c["BLOCK_H1"], c["BLOCK_H2"]) for _, _, c, _, _ in chain}
    assert (64, 64, 64) in blocks and (128, 128, 128) in blocks
    assert mlp_chain.chain_path([256, 256, 1000, 256, 1000], 2) == "per_layer"  # 256 KiB W1 tile
    assert mlp_chain.chain_path([129, 200, 1000, 10, 10], 2) == "per_layer"
    assert mlp_chain.chain_path([1024, 64, 1000, 64, 10], 2) == "per_layer"
    fused_n = {c["BLOCK_N"] for _, _, c, _, _ in _linear_jobs() if c.get("SOFTMAX")}
    assert max(fused_n) == 512 and 16 in fused_n
    # every divergence and AB form, in one tile (K = 4096) and walked in chunks (K = 32000, 131072)
    wide = {(c["DIV"], c["AB_CASE"], c["SINGLE_TILE"]) for _, _, c, _, _ in _divergence_jobs() if c["BLOCK_K"] == 4096}
    assert len(wide) == 2 * (len(divergence.NAMES) - 1 + 5)


def test_every_kernel_compiles_for_sm80_and_sm90(aot_results):
    bad = [f"{_describe(r)}: {r['error']}" for r in aot_results if not r["ok"]]
    assert not bad, "\n".join(bad[:5])


def test_shared_memory_within_each_architecture(aot_results):
    bad = [f"{_describe(r)}: {r['shared']} B > {SMEM_LIMIT[r['cc']]} B" for r in aot_results
           if r["ok"] and r["shared"] > SMEM_LIMIT[r["cc"]]]
    assert not bad, "\n".join(bad)


def test_register_spills_within_budget(aot_results):
    bad = [f"{_describe(r)}: spills {r['spill_stores']} B stores / {r['spill_loads']} B loads" for r in aot_results
           if r["ok"] and max(r["spill_stores"], r["spill_loads"]) > SPILL_BUDGET]
    assert not bad, "\n".join(bad)
