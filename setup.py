"""Build of pangu_fastkd and its C++ extension ``pangu_fastkd._C``.

Build against the torch that is already installed: ``pip install --no-build-isolation -e .``
(``scripts/setup.sh`` does this). Environment switches:
  PANGU_FASTKD_NATIVE=0      portable build without -march=native
  PANGU_FASTKD_DEBUG=1       -O0 -g, assertions on
  PANGU_FASTKD_WITH_ASCEND   unset: also build the Ascend C kernels (pangu_fastkd._ascend, via
                             CMake, cmake/ascend.cmake) when CANN and torch_npu are found, and
                             skip them with one line if that build fails (CMake output in
                             build/ascend-<SOC_VERSION>.log); 0: never; 1: always (missing CANN
                             or torch_npu, or a failed build, is an error)
  ASCEND_HOME_PATH, ASCEND_CANN_PACKAGE_PATH, SOC_VERSION: see pangu_fastkd/_ascend_build.py
                             and docs/ascend.md
"""

import glob
import importlib.util
import os
import shutil
import sys

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _ascend_build_module():
    # Loaded by path: the package itself is not importable before it is built.
    path = os.path.join(ROOT, "pangu_fastkd", "_ascend_build.py")
    spec = importlib.util.spec_from_file_location("_pangu_fastkd_ascend_build", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


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


class BuildWithAscend(BuildExtension):
    """build_ext that also builds pangu_fastkd._ascend with CMake when the plan says so."""

    def run(self) -> None:
        # Decide first, so that PANGU_FASTKD_WITH_ASCEND=1 without CANN fails before compiling.
        ascend_build = _ascend_build_module()
        plan = ascend_build.plan_ascend_build(kernel_dir=os.path.join(ROOT, "csrc", "ascend"))
        super().run()
        if not plan.enabled:
            # The plan's reason is now the truth, not an earlier build's failure.
            ascend_build.clear_recorded_skip(os.path.join(ROOT, "build"))
            print(plan.skip_message(), flush=True)
            return
        self._build_ascend(ascend_build, plan)

    def _build_ascend(self, ascend_build, plan) -> None:
        import torch

        # The CMake output goes to build/ascend-<soc>.log: an optional build that fails prints
        # one line and the install carries on with the CPU build; PANGU_FASTKD_WITH_ASCEND=1
        # fails it (ascend_build.build_ascend).
        build_dir = os.path.join(ROOT, "build", f"ascend-{plan.soc_version}")
        configure = [
            "cmake", "-S", ROOT, "-B", build_dir,
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            "-DPANGU_FASTKD_WITH_ASCEND=ON",
            f"-DASCEND_CANN_PACKAGE_PATH={plan.cann_path}",
            f"-DSOC_VERSION={plan.soc_version}",
            f"-DPANGU_FASTKD_NATIVE={'ON' if _flag('PANGU_FASTKD_NATIVE', '1') else 'OFF'}",
        ]  # fmt: skip
        build = ["cmake", "--build", build_dir, "--target", "_ascend", "-j2"]
        steps = [("cmake configure", configure), ("cmake --build", build)]
        if not ascend_build.build_ascend(plan, steps, f"{build_dir}.log"):
            return
        built = glob.glob(os.path.join(build_dir, "_ascend*.so"))
        if len(built) != 1:
            raise RuntimeError(f"expected one _ascend*.so in {build_dir}, found {built}")
        target = self.get_ext_fullpath("pangu_fastkd._ascend")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(built[0], target)
        print(f"pangu_fastkd: Ascend C kernels built for {plan.soc_version}", flush=True)


setup(
    name="pangu_fastkd",
    version="0.1.0",
    description="Kernel-first toolkit for knowledge-distillation post-training of small LMs",
    packages=find_packages(include=["pangu_fastkd", "pangu_fastkd.*"]),
    # The shipped models (pangu_fastkd/pretrained/<name>/) and the trainer's configs.
    package_data={
        "pangu_fastkd.pretrained": ["*/*.json", "*/*.safetensors"],
        "pangu_fastkd.train": ["configs/*.toml"],
    },
    python_requires=">=3.10",
    install_requires=["numpy", "safetensors", "matplotlib", "tqdm"],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "ruff", "tokenizers"],
        # Local Hugging Face tokenizer.json files (pangu_fastkd.data.HFTokenizer).
        "tokenizers": ["tokenizers>=0.20"],
        # Hugging Face checkpoints and models (pangu_fastkd.hf); transformers needs no torch pin.
        "hf": ["transformers>=5.0,<6", "tokenizers>=0.20"],
        # [logging] tensorboard = true (torch.utils.tensorboard writes the event files).
        "tensorboard": ["tensorboard>=2.14"],
    },
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildWithAscend.with_options(use_ninja=True)},
    zip_safe=False,
)
