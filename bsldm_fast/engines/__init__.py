"""Compiled networks: ONNX export, the TensorRT engine cache, the network runners and the
CUDA-graph pipeline."""

from .cache import EngineError, EngineKey, model_hash
from .gpu_pipeline import BACKENDS, GraphPipeline, build_pipeline
from .graphs import GRAPH_NAMES, BatchProfile, graph_spec
from .onnx_export import check_graph, export_model_dir, onnx_path
from .runners import TensorRTRunner, TorchRunner

__all__ = [
    "BACKENDS",
    "GRAPH_NAMES",
    "BatchProfile",
    "EngineError",
    "EngineKey",
    "GraphPipeline",
    "TensorRTRunner",
    "TorchRunner",
    "build_pipeline",
    "check_graph",
    "export_model_dir",
    "graph_spec",
    "model_hash",
    "onnx_path",
]
