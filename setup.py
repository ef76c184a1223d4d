"""Build of pangu_fastkd and its C++ extension ``pangu_fastkd._C``.

Build against the torch that is already installed: ``pip install --no-build-isolation -e .``
(``scripts/setup.sh`` does this). Environment switches:
  PANGU_FASTKD_NATIVE=0      portable build without -march=native
  PANGU_FASTKD_DEBUG=1       -O0 -g, assertions on
  PANGU_FASTKD_WITH_ASCEND=1 also build csrc/ascend (needs CANN; not part of this build yet)
"""

import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str, default: str) -> bool:
    return os.environ.get(name, default) not in ("0", "", "false", "False")


def extension() -> CppExtension:
    # Sources by glob: a backend is in the build exactly when its directory's files are.
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    debug = _flag("PANGU_FASTKD_DEBUG", "0")
    cxx = [
        "-std=c++20",
        "-fopenmp",
        "-O0" if debug else "-O3",
        "-fno-math-errno",
        "-Wno-unknown-pragmas",
        "-Wno-maybe-uninitialized",
    ]
    if debug:
        cxx += ["-g", "-UNDEBUG"]
    if _flag("PANGU_FASTKD_NATIVE", "1"):
        cxx.append("-march=native")
    return CppExtension(
        name="pangu_fastkd._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )


setup(
    name="pangu_fastkd",
    version="0.1.0",
    description="Kernel-first toolkit for knowledge-distillation post-training of small LMs",
    packages=find_packages(include=["pangu_fastkd", "pangu_fastkd.*"]),
    python_requires=">=3.10",
    install_requires=["numpy", "safetensors", "matplotlib"],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "ruff", "tokenizers"],
        # Local Hugging Face tokenizer.json files (pangu_fastkd.data.HFTokenizer).
        "tokenizers": ["tokenizers>=0.20"],
    },
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
