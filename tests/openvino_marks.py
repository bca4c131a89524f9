"""What the OpenVINO tests share: the skip mark for a machine without OpenVINO, and whether this CPU
runs bf16 natively (elsewhere OpenVINO's bf16 hint falls back to f32)."""

import importlib.util

import pytest

needs_openvino = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None or importlib.util.find_spec("onnx") is None,
    reason="OpenVINO or onnx is not installed: pip install 'bsldm-fast[openvino]'")


def native_bf16() -> bool:
    import openvino

    return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
