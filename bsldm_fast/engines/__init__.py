"""Compiled networks: ONNX export, the TensorRT engine cache, and the TensorRT runners."""

from .cache import EngineError, EngineKey, model_hash
from .graphs import GRAPH_NAMES, BatchProfile, graph_spec
from .onnx_export import check_graph, export_model_dir, onnx_path

__all__ = [
    "GRAPH_NAMES",
    "BatchProfile",
    "EngineError",
    "EngineKey",
    "check_graph",
    "export_model_dir",
    "graph_spec",
    "model_hash",
    "onnx_path",
]
