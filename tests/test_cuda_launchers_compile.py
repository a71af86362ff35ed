"""The torch-facing CUDA launchers (csrc/cuda/*_launcher.cpp) compile against this torch's headers.

The kernels (csrc/cuda/*.cu) are compiled by CMake in CI for sm_80 and sm_90 whenever nvcc is found; the launchers
include ATen and c10/cuda headers, which only the pip build of a CUDA torch compiles. This test checks them with
``g++ -std=c++20 -fsyntax-only`` (the standard torch 2.13+ builds extensions with; parsing, overload resolution
and template instantiation, no code generation) against the installed torch's headers and the CUDA toolkit's, so
that a launcher change is proven to compile without a GPU.
A CPU wheel of torch ships the c10/cuda headers but not the one its CMake build generates
(``c10/cuda/impl/cuda_cmake_macros.h``); an empty stand-in is written for it. Skips without g++ or CUDA headers.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHERS = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*_launcher.cpp")))


def _cuda_include():
    candidates = []
    if cpp_extension.CUDA_HOME:
        candidates.append(os.path.join(cpp_extension.CUDA_HOME, "include"))
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include"))
    candidates.append("/usr/local/cuda/include")
    for inc in candidates:
        if os.path.exists(os.path.join(inc, "cuda_runtime_api.h")):
            return inc
    return None


CUDA_INCLUDE = _cuda_include()
pytestmark = pytest.mark.skipif(shutil.which("g++") is None or CUDA_INCLUDE is None,
                                reason="needs g++ and the CUDA toolkit's headers")


@pytest.fixture(scope="module")
def compile_all(tmp_path_factory):
    stub = tmp_path_factory.mktemp("stub")
    torch_inc = os.path.join(os.path.dirname(torch.__file__), "include")
    if not os.path.exists(os.path.join(torch_inc, "c10", "cuda", "impl", "cuda_cmake_macros.h")):
        os.makedirs(stub / "c10" / "cuda" / "impl")
        (stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text("#pragma once\n")
    flags = ["g++", "-std=c++20", "-fsyntax-only", "-DTGTFAST_WITH_CUDA",
             "-I" + torch_inc, "-I" + os.path.join(torch_inc, "torch", "csrc", "api", "include"), "-I" + str(stub),
             "-I" + CUDA_INCLUDE, "-I" + os.path.join(ROOT, "csrc"), "-I" + os.path.join(ROOT, "csrc", "common")]

    def one(path):
        proc = subprocess.run(flags + [path], capture_output=True, text=True)
        return path, proc.returncode, proc.stderr

    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        return {os.path.basename(p): (rc, err) for p, rc, err in pool.map(one, LAUNCHERS)}


def test_every_op_stem_has_a_launcher():
    stems = {os.path.basename(p)[: -len("_cuda.cu")] for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*_cuda.cu"))}
    assert stems and {os.path.basename(p)[: -len("_cuda_launcher.cpp")] for p in LAUNCHERS} == stems


@pytest.mark.parametrize("name", [os.path.basename(p) for p in LAUNCHERS])
def test_launcher_compiles(compile_all, name):
    rc, err = compile_all[name]
    errors = [line for line in err.splitlines() if "error" in line]
    assert rc == 0, "\n".join(errors[:20]) or err[-4000:]
