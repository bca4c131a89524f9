"""Build of bsldm-fast and its compiled extension bsldm_fast._C.

Build with torch already installed, without build isolation (the extension links against the
installed torch, which an isolated build environment would not have):

    pip install --no-build-isolation -e .

BSLDM_FAST_WITH_CUDA=0 forces a CPU-only extension; =1 requires the CUDA sources to be built.
Unset, CUDA is used when torch is a CUDA build and a CUDA toolkit with nvcc is found.
"""

import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - depends on the build environment
    sys.exit(
        "bsldm-fast: building the extension needs torch installed first, and a build without "
        "isolation: pip install torch && pip install --no-build-isolation -e ."
    )

ROOT = Path(__file__).resolve().parent


def _sources(pattern: str) -> list[str]:
    """csrc files matching `pattern`, relative to the project root, tests excluded."""
    return sorted(
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "csrc").glob(pattern)
        if "tests" not in path.relative_to(ROOT / "csrc").parts
    )


def _want_cuda() -> bool:
    forced = os.environ.get("BSLDM_FAST_WITH_CUDA")
    nvcc = cpp_extension.CUDA_HOME and Path(cpp_extension.CUDA_HOME, "bin", "nvcc").exists()
    # torch.version.cuda is None for CPU and ROCm builds; ROCm is excluded because its build
    # would hipify (rewrite) the sources.
    possible = torch.version.cuda is not None and bool(nvcc)
    if forced == "0":
        return False
    if forced == "1":
        if not possible:
            sys.exit(
                "bsldm-fast: BSLDM_FAST_WITH_CUDA=1 but a CUDA build is impossible "
                f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}, "
                f"nvcc found={bool(nvcc)})"
            )
        return True
    if forced not in (None, ""):
        sys.exit(f"bsldm-fast: BSLDM_FAST_WITH_CUDA must be 0 or 1, got {forced!r}")
    return possible


def _extension():
    # -ffp-contract=off: the ops are bit-exact twins of their PyTorch references, and a fused
    # multiply-add would change last bits (see CMakeLists.txt).
    if sys.platform == "win32":
        cxx, link = ["/O2", "/openmp", "/fp:precise"], []
    elif sys.platform == "darwin":  # Apple clang has no -fopenmp
        cxx, link = ["-O3", "-ffp-contract=off"], []
    else:
        cxx, link = ["-O3", "-fopenmp", "-ffp-contract=off"], ["-fopenmp"]
    sources = _sources("**/*.cpp")
    if _want_cuda():
        return cpp_extension.CUDAExtension(
            "bsldm_fast._C",
            sources=sources + _sources("**/*.cu"),
            define_macros=[("WITH_CUDA", None)],
            # --fmad=false for the same reason as -ffp-contract=off: the kernels repeat their
            # references' float32 operations one by one.
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--fmad=false"]},
            extra_link_args=link,
        )
    return cpp_extension.CppExtension(
        "bsldm_fast._C", sources=sources, extra_compile_args={"cxx": cxx}, extra_link_args=link
    )


package_data = {}
if (ROOT / "bsldm_fast" / "assets").is_dir():
    package_data["bsldm_fast"] = ["assets/**/*"]

setup(
    name="bsldm-fast",
    version="0.1.0",
    packages=find_packages(include=["bsldm_fast", "bsldm_fast.*"]),
    package_data=package_data,
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "pillow", "safetensors", "tqdm", "pydicom>=3.0", "tifffile"],
    extras_require={
        "train": ["pyyaml"],
        "onnx": ["onnx", "onnxruntime"],
        # `--backend openvino`: the networks compiled by OpenVINO for the CPU (engines/openvino.py).
        "openvino": ["openvino==2026.4.1", "onnx"],
        # The int8 networks on the CPU (bsldm_fast/engines/int8.py): NNCF quantises the ONNX U-Net and
        # VQ encoder and decoder to OpenVINO IRs. Pinned: the IR's manifest names both versions, and a new one re-quantises.
        "int8": ["openvino==2026.4.1", "onnx", "nncf==3.4.0"],
        "bench": ["matplotlib", "pytest-benchmark"],
        # `bsldm-fast serve`, the DICOM node (bsldm_fast/node).
        "node": ["pynetdicom>=2.1"],
        # The reference implementations the equivalence tests compare against, and the Triton
        # interpreter that runs the GPU kernels on the CPU. monai-generative pins an old monai, so
        # scripts/test.sh installs monai + monai-generative separately with --no-deps.
        "test": [
            "pytest", "pytest-benchmark", "hypothesis", "pyyaml", "tifffile", "scikit-image",
            "onnx", "onnxruntime", "diffusers", "guided-diffusion-sdk", "matplotlib",
            "pynetdicom>=2.1", "openvino==2026.4.1", "nncf==3.4.0",
            "triton==3.6.0; platform_system == 'Linux' and platform_machine == 'x86_64'",
        ],
    },
    entry_points={"console_scripts": ["bsldm-fast = bsldm_fast.cli:main"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
