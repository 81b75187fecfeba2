"""Builds torch_directconv._C: the torch-free core (csrc/conv, csrc/jit) plus the torch layer."""

import glob
import os
import sys

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def xbyak_include_dir() -> str:
    candidates = [os.environ.get("XBYAK_INCLUDE_DIR", ""), "/usr/include", "/usr/local/include"]
    if os.environ.get("CONDA_PREFIX"):
        candidates.append(os.path.join(os.environ["CONDA_PREFIX"], "include"))
    for d in candidates:
        if d and os.path.isfile(os.path.join(d, "xbyak", "xbyak.h")):
            return d
    sys.exit(
        "torch_directconv: Xbyak (header-only) was not found.\n"
        "  Install it with 'apt-get install libxbyak-dev' (Debian/Ubuntu) or 'conda install -c conda-forge xbyak',\n"
        "  or set XBYAK_INCLUDE_DIR to the folder that holds xbyak/xbyak.h. 'make setup' does this for you."
    )


sources = sorted(
    os.path.relpath(p, HERE)
    for pattern in ("csrc/conv/*.cpp", "csrc/dist/*.cpp", "csrc/jit/*.cpp", "csrc/torch/*.cpp")
    for p in glob.glob(os.path.join(HERE, pattern))
)

setup(
    name="torch_directconv",
    version="0.1.0",
    description="JIT-generated direct convolutions for x86 CPUs (AVX-512, AVX2) as PyTorch ops",
    packages=["torch_directconv"],
    ext_modules=[
        CppExtension(
            "torch_directconv._C",
            sources,
            include_dirs=[os.path.join(HERE, "csrc"), xbyak_include_dir()],
            # The C++ standard is the one torch asks for (its headers need C++20 bit-field
            # initialisers); the torch-free core is C++17.
            # at::parallel_for is inline and uses OpenMP only when the caller is compiled
            # with it. Linking -fopenmp resolves to the libgomp torch has already loaded
            # (same soname), so there is still one OpenMP runtime in the process.
            extra_compile_args=["-O3", "-Wall", "-fopenmp"],
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
)
