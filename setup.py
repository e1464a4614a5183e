"""Build of tetri-engine and its native extension `tetri_engine._C` (sources in csrc/).

Install it against the torch that is already installed:

    pip install --no-build-isolation -e .[dev]

What gets built:
  * CUDA build (CUDAExtension) when torch has CUDA (torch.version.cuda), nvcc is found (CUDA_HOME) with
    the same major CUDA version as torch's, and NCCL headers are found: the CPU sources, plus the CUDA kernels (csrc/latent_kernels.cu) and the NCCL
    communicator (csrc/nccl_comm.cpp). NCCL is the one torch itself loads: the `nvidia-nccl-cu*` pip
    package (site-packages/nvidia/nccl/{include,lib/libnccl.so.2}), linked with an rpath to it, so the
    process holds a single NCCL; failing that, a system NCCL (/usr/include/nccl.h, -lnccl).
  * CPU build (CppExtension) otherwise: latent ops and the thread communicator; asking a CommCache
    for CUDA devices raises a RuntimeError that says so.

Build switches (environment variables, read when this file runs):
  TETRI_FORCE_CPU=1     build the CPU extension even where a CUDA build is possible.
  TETRI_NCCL_HOME=DIR   take NCCL from DIR/include/nccl.h and DIR/lib/libnccl.so* instead.
  TETRI_DEBUG=1         compile with -O0 -g (default: -O3).
  MAX_JOBS=N            parallel compile jobs; default: the CPU count, at most 4 (each job compiling
                        against torch headers needs about 2 GB of memory). Read by torch's builder.
  TORCH_CUDA_ARCH_LIST  GPU architectures for the .cu (e.g. "9.0" for H100/H200); torch's default is
                        the visible GPUs' architectures. Read by torch's builder.
  CXX / CC              the host compiler torch's builder uses. It must link libstdc++ dynamically:
                        a wrapper that links a private static copy (seen: the GPU image's
                        /opt/gcc/bin/g++) gives an extension whose iostreams segfault on first use.
                        There, build with `CXX=g++ CC=gcc` (bench/gpu_checks.sh does).
"""
from __future__ import annotations

import glob
import os
import re
import site
import subprocess
import sys
import sysconfig

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"
# Few translation units on purpose: each one that includes torch headers takes tens of seconds.
CPU_SOURCES = ["bindings.cpp", "latent_ops.cpp", "thread_comm.cpp", "comm_cache.cpp", "devices.cpp", "step_loop.cpp"]
CUDA_SOURCES = ["latent_kernels.cu", "nccl_comm.cpp"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _site_dirs() -> list[str]:
    dirs = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    try:
        dirs += site.getsitepackages()
    except AttributeError:  # some virtualenvs
        pass
    return list(dict.fromkeys(dirs))


def find_nccl() -> tuple[str, str, str] | None:
    """(include dir, lib dir, library file) of the NCCL to link, or None."""
    home = os.environ.get("TETRI_NCCL_HOME")
    candidates = [home] if home else []
    candidates += [os.path.join(d, "nvidia", "nccl") for d in _site_dirs()]
    for base in candidates:
        include, lib = os.path.join(base, "include"), os.path.join(base, "lib")
        libs = sorted(glob.glob(os.path.join(lib, "libnccl.so*")))
        if os.path.isfile(os.path.join(include, "nccl.h")) and libs:
            return include, lib, os.path.basename(libs[0])
    if home:
        sys.exit(f"TETRI_NCCL_HOME={home}: no include/nccl.h and lib/libnccl.so* there")
    for include, lib in (("/usr/include", "/usr/lib/x86_64-linux-gnu"), ("/usr/local/include", "/usr/local/lib")):
        libs = sorted(glob.glob(os.path.join(lib, "libnccl.so*")))
        if os.path.isfile(os.path.join(include, "nccl.h")) and libs:
            return include, lib, os.path.basename(libs[0])
    return None


def nvcc_version(cuda_home: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except OSError:
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def cuda_build_possible(torch, cuda_home: str | None) -> bool:
    """torch has CUDA, nvcc is there, and its major version is torch's (torch refuses a mismatch)."""
    if _flag("TETRI_FORCE_CPU") or torch.version.cuda is None or cuda_home is None:
        return False
    nvcc = nvcc_version(cuda_home)
    torch_major = int(torch.version.cuda.split(".")[0])
    if nvcc is None or nvcc[0] != torch_major:
        print(f"tetri-engine: nvcc in {cuda_home} is CUDA {nvcc}, torch was built with CUDA {torch.version.cuda}: "
              "building the CPU extension")
        return False
    return True


def extension_modules():
    import torch
    from torch.utils import cpp_extension

    os.environ.setdefault("MAX_JOBS", str(max(1, min(os.cpu_count() or 1, 4))))
    opt = ["-O0", "-g"] if _flag("TETRI_DEBUG") else ["-O3"]
    cxx_flags = list(opt)  # the C++ standard comes from torch's builder (it matches torch's headers)
    sources = [os.path.join(CSRC, s) for s in CPU_SOURCES]

    nccl = None
    want_cuda = cuda_build_possible(torch, cpp_extension.CUDA_HOME)
    if want_cuda:
        nccl = find_nccl()
        if nccl is None:
            print("tetri-engine: no NCCL found (nvidia-nccl-cu* package or system); building the CPU extension")
    if want_cuda and nccl is not None:
        include, lib, lib_file = nccl
        print(f"tetri-engine: CUDA build (torch CUDA {torch.version.cuda}, nvcc in {cpp_extension.CUDA_HOME}, "
              f"NCCL {os.path.join(lib, lib_file)})")
        return [
            cpp_extension.CUDAExtension(
                name="tetri_engine._C",
                sources=sources + [os.path.join(CSRC, s) for s in CUDA_SOURCES],
                include_dirs=[os.path.join(ROOT, CSRC), include],
                define_macros=[("TETRI_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx_flags, "nvcc": opt + ["-DTETRI_WITH_CUDA=1"]},
                # Link the exact file (the pip package ships only libnccl.so.2) and find it at run time
                # where torch finds it, so both use one NCCL.
                extra_link_args=[f"-L{lib}", f"-l:{lib_file}", f"-Wl,-rpath,{lib}"],
            )
        ]
    print("tetri-engine: CPU build (thread communicator only)")
    return [
        cpp_extension.CppExtension(
            name="tetri_engine._C",
            sources=sources,
            include_dirs=[os.path.join(ROOT, CSRC)],
            extra_compile_args={"cxx": cxx_flags},
        )
    ]


def main():
    from torch.utils.cpp_extension import BuildExtension

    setup(
        ext_modules=extension_modules(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )


main()
