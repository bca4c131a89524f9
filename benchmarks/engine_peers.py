"""Peers: what a deployment engineer would run from the same exported ONNX graphs, runner-shaped so
that `benchmarks/run.py` times them through the same `Pipeline` calls as ours.

- `OnnxRuntimePeer`: ONNX Runtime's CPU execution provider on the fp32 graphs as exported;
- `OpenVINOPeer`: OpenVINO on the fp32 graphs with its bf16 inference-precision hint and nothing
  else (no float32 cuts, unlike our `engines.openvino.OpenVINORunner`).

Both read the graphs `onnx_export.export_model_dir` writes to a model directory (`onnx/<graph>-fp32.onnx`,
the files our OpenVINO runner compiles too), build each graph's session on its first call (one per
batch size for OpenVINO, which needs static shapes), and hold the float32 codebook as `codes`, so a
`Pipeline` can quantise sampled latents with them. The exported encoder graph ends with the codebook
search (`graphs.EncoderGraph`), so `encode` returns quantised latents, as the Pipeline expects.

`RunnerWith` wraps any runner and replaces some of its calls: the benchmark's free-U-Net runner and
the tests' deliberately broken runners are both one.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bsldm_fast.config import ModelConfig
from bsldm_fast.models import VQGAN, UNet

GRAPHS = {"encoder": ("image",), "unet": ("U", "t"), "decoder": ("latent",)}
"""Each exported graph's inputs, in order (engines/graphs.py `graph_spec`)."""


def _missing(*modules: str) -> str | None:
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            return f"{module} is not installed"
    return None


def onnxruntime_unavailable() -> str | None:
    """Why the ONNX Runtime peer cannot run here (None: it can)."""
    return _missing("onnx", "onnxruntime")


def openvino_peer_unavailable() -> str | None:
    """Why the OpenVINO peer cannot run here (None: it can)."""
    return _missing("onnx", "openvino")


def onnx_graphs(model_dir: str | Path, config: ModelConfig, vqgan: VQGAN, unet: UNet) -> Callable[[str], Path]:
    """graph name -> the path of its fp32 ONNX file in `model_dir`, exported on first use (and kept:
    our OpenVINO runner reads the same files)."""
    from bsldm_fast.engines.onnx_export import export_model_dir
    from bsldm_fast.modeldir import Model

    def path(graph: str) -> Path:
        return export_model_dir(model_dir, "fp32", (graph,), model=Model(config, vqgan, unet, str(model_dir)))[0].path
    return path


class _Peer:
    name = precision = ""

    def __init__(self, graphs: Callable[[str], Path], codes: torch.Tensor | None):
        self.graphs = graphs
        self.codes = None if codes is None else codes.detach().to("cpu", torch.float32).contiguous()
        """The float32 codebook [K, 4], for the Pipeline's quantising of sampled latents."""

    def _run(self, graph: str, *inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self._run("encoder", images.float())

    def denoise(self, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.expand(u.shape[0]) if t.dim() == 0 else t
        return self._run("unet", u.float(), t.to(torch.int64))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._run("decoder", latents.float())


def _numpy(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().cpu().numpy())


class OnnxRuntimePeer(_Peer):
    """ONNX Runtime on the CPU, on the fp32 ONNX graphs as exported (default session options)."""

    name, precision = "onnxruntime", "fp32"

    def __init__(self, graphs: Callable[[str], Path], codes: torch.Tensor | None = None):
        super().__init__(graphs, codes)
        self.sessions: dict = {}

    def _run(self, graph: str, *inputs: torch.Tensor) -> torch.Tensor:
        session = self.sessions.get(graph)
        if session is None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.log_severity_level = 3
            session = self.sessions[graph] = ort.InferenceSession(
                str(self.graphs(graph)), options, providers=["CPUExecutionProvider"])
        out = session.run(None, {k: _numpy(v) for k, v in zip(GRAPHS[graph], inputs)})[0]
        return torch.from_numpy(out)


class OpenVINOPeer(_Peer):
    """OpenVINO on the fp32 ONNX graphs with the bf16 inference-precision hint and defaults,
    reshaped to a static batch (compiled once per graph and batch size)."""

    name, precision = "openvino-default", "bf16"

    def __init__(self, graphs: Callable[[str], Path], codes: torch.Tensor | None = None):
        super().__init__(graphs, codes)
        self.compiled: dict = {}

    def _run(self, graph: str, *inputs: torch.Tensor) -> torch.Tensor:
        key = (graph, inputs[0].shape[0])
        compiled = self.compiled.get(key)
        if compiled is None:
            import openvino as ov

            core = ov.Core()
            model = core.read_model(str(self.graphs(graph)))
            model.reshape({p.get_any_name(): [key[1], *list(p.get_partial_shape())[1:]] for p in model.inputs})
            compiled = self.compiled[key] = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
        result = compiled([_numpy(x) for x in inputs])
        return torch.from_numpy(np.array(result[0], dtype=np.float32))


class RunnerWith:
    """`runner` with some of its calls replaced: `RunnerWith(r, denoise=f)` runs r's encode and
    decode and `f` for the U-Net; `wrap=True` passes the runner's own call as the first argument
    (`denoise=lambda own, u, t: own(u, t) * 2`). Name, precision and codebook are the runner's
    unless given."""

    def __init__(self, runner, name: str | None = None, wrap: bool = False, **calls: Callable):
        unknown = set(calls) - {"encode", "denoise", "decode"}
        if unknown:
            raise ValueError(f"a runner has no call {sorted(unknown)}")
        self.runner = runner
        self.name = name or runner.name
        self.precision, self.codes = runner.precision, runner.codes
        for call in ("encode", "denoise", "decode"):
            own = getattr(runner, call)
            if call not in calls:
                setattr(self, call, own)
            elif wrap:
                setattr(self, call, lambda *args, _f=calls[call], _own=own: _f(_own, *args))
            else:
                setattr(self, call, calls[call])
