"""Every CUDA source compiles with nvcc, so CUDA code cannot rot on machines without a GPU.

The .cu files are torch-free (csrc/ops.cpp does the torch side), so this needs only nvcc; torch's
include paths are passed anyway, as the extension build would. Their numerics are tested against
the references by test_steps.py / test_philox.py whenever a GPU and a CUDA build are present.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[2]
CU_FILES = sorted((ROOT / "csrc").rglob("*.cu"))


def _nvcc() -> str | None:
    home = cpp_extension.CUDA_HOME
    if home and Path(home, "bin", "nvcc").exists():
        return str(Path(home, "bin", "nvcc"))
    return shutil.which("nvcc")


def test_there_are_cuda_sources():
    assert CU_FILES, "no .cu files under csrc/"


@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_cuda_source_compiles(source, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    includes = [f"-I{path}" for path in [ROOT / "csrc", *cpp_extension.include_paths()]]
    command = [nvcc, "-c", "-std=c++17", "-O1", "--fmad=false", "-DWITH_CUDA", "-Werror", "all-warnings",
               *includes, str(source), "-o", str(tmp_path / (source.stem + ".o"))]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"nvcc failed:\n{' '.join(command)}\n{result.stdout}\n{result.stderr}"
