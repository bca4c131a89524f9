"""Compiled networks: ONNX export, the TensorRT engine cache and the network runners."""

from .cache import EngineError, EngineKey, model_hash
from .graphs import GRAPH_NAMES, BatchProfile, graph_spec
from .onnx_export import check_graph, export_model_dir, onnx_path
from .runners import BACKENDS, TensorRTRunner, TorchRunner, make_runner

__all__ = [
    "BACKENDS",
    "GRAPH_NAMES",
    "BatchProfile",
    "EngineError",
    "EngineKey",
    "TensorRTRunner",
    "TorchRunner",
    "check_graph",
    "export_model_dir",
    "graph_spec",
    "make_runner",
    "model_hash",
    "onnx_path",
]
