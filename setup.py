"""Build of tgtfast and its compiled extension ``tgtfast._C``.

Install after torch: ``pip install --no-build-isolation .`` (ninja is used when installed).

Environment variables:
  TGTFAST_USE_CPP=0         install pure Python (no compiled extension; the reference and Triton backends remain)
  TGTFAST_SKIP_CUDA_BUILD=1 build only the C++ CPU kernels even when torch has CUDA and nvcc is found
  TGTFAST_CUDA_ARCHS        CUDA architectures, default "80;90"
  TGTFAST_NATIVE=1          compile the C++ kernels with -march=native (a local build; not for wheels)
  DEBUG=1                   -O0 -g
  MAX_JOBS                  parallel compile jobs (read by torch's build extension)

The CPU kernels are compiled twice, for AVX2+FMA and for the baseline instruction set, and the faster
one the processor supports is chosen at run time: a wheel built here runs on any x86-64 processor.
"""

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str, default: str = "0") -> bool:
    return os.environ.get(name, default).strip().lower() in ("1", "true", "yes", "on")


def _extensions():
    if not _flag("TGTFAST_USE_CPP", "1"):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:  # pragma: no cover - build-time message
        raise RuntimeError(
            "tgtfast builds its extension against the installed torch: install torch first, then run "
            "`pip install --no-build-isolation .`"
        ) from exc

    debug = _flag("DEBUG")
    # -fno-trapping-math lets GCC turn the NaN-safe selects of csrc/common/cpu_math.h into vector blends; unlike
    # -ffast-math it keeps NaN and inf semantics (the bad-input tests rely on them).
    # -fopenmp: at::parallel_for is inline OpenMP in torch's headers and silently runs on one thread without it.
    # No -std: torch's build adds the standard its headers need (C++17 up to torch 2.12, C++20 from 2.13; torch
    # 2.14's ATen refuses C++17), for the C++ and the nvcc compilations alike.
    cxx = ["-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    cxx += ["-O0", "-g"] if debug else ["-O3"]
    if _flag("TGTFAST_NATIVE"):
        cxx.append("-march=native")
    # One folder per op stem (csrc/<stem>/), shared helpers in csrc/common/; csrc/cuda/ only with CUDA.
    cuda_dir = os.path.join("csrc", "cuda") + os.sep
    sources = sorted(
        path for path in glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True)
        if not path.startswith(cuda_dir)
    )
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "common")]

    with_cuda = (
        torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and not _flag("TGTFAST_SKIP_CUDA_BUILD")
    )
    if with_cuda:
        archs = os.environ.get("TGTFAST_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
        nvcc = ["--expt-relaxed-constexpr", "-lineinfo", "--threads", "2"]
        nvcc += ["-O0", "-g", "-G"] if debug else ["-O3"]
        for arch in filter(None, (a.strip() for a in archs)):
            nvcc += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        ext = cpp_extension.CUDAExtension(
            "tgtfast._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("TGTFAST_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "tgtfast._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    build = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["tgtfast", "tgtfast.*"]) + ["tgtfast.kernels"],
    package_dir={"tgtfast": "tgtfast", "tgtfast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
