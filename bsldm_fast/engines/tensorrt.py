"""TensorRT engines: build from ONNX, cache in the model directory, and run as the pipeline's networks.

A thin layer over TensorRT's documented Python API (TensorRT 10.x; `tensorrt` from NVIDIA's wheels):
build: Builder -> create_network(STRONGLY_TYPED) -> OnnxParser.parse_from_file -> IBuilderConfig
(set_memory_pool_limit, timing cache, one optimisation profile over the batch) ->
build_serialized_network; run: Runtime.deserialize_cuda_engine -> create_execution_context ->
set_input_shape / set_tensor_address on torch-allocated buffers -> execute_async_v3 on the current
torch CUDA stream.

NOTE: the networks are strongly typed: the precision is the ONNX graph's own (fp16/bf16 weights,
float32 GroupNorm by explicit casts, FP8/INT8 as Q/DQ nodes), not BuilderFlag.FP16/BF16 hints.
TensorRT deprecated those weakly typed flags in 10.12 and drops them in 11, and per-layer float32
constraints would be needed to keep GroupNorm in float32 under them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .._files import atomic_write
from ..config import ModelConfig
from .cache import (ENGINE_PRECISIONS, EngineError, EngineKey, engine_dir, ensure_engine, find_engine,
                    model_hash)
from .graphs import GRAPH_NAMES, BatchProfile, GraphSpec, graph_spec

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "TensorRT is not installed: install NVIDIA's `tensorrt` wheel (TensorRT 10.x, from NVIDIA's "
    "package index: pip install tensorrt) on a machine with an NVIDIA GPU"
)


def tensorrt_module():
    """`import tensorrt`, or EngineError saying how to get it."""
    try:
        import tensorrt
    except ImportError as error:
        raise EngineError(INSTALL_HINT) from error
    return tensorrt


def available() -> bool:
    """Whether TensorRT and a CUDA device are both present."""
    try:
        tensorrt_module()
    except EngineError:
        return False
    return torch.cuda.is_available()


@dataclass(frozen=True)
class Target:
    """The machine an engine is built for: TensorRT version and GPU."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str

    @classmethod
    def current(cls, device: torch.device | str | None = None) -> "Target":
        trt = tensorrt_module()
        if not torch.cuda.is_available():
            raise EngineError("TensorRT engines need an NVIDIA GPU, and torch sees no CUDA device")
        props = torch.cuda.get_device_properties(torch.device("cuda") if device is None else device)
        return cls(trt.__version__, props.name, f"{props.major}.{props.minor}")


def onnx_precision(graph: str, precision: str) -> str:
    """The ONNX graph an engine of `precision` is built from.

    fp8/int8 quantise the U-Net, where nearly all the FLOPs are; the VQGAN runs in fp16.
    """
    if precision in ("fp8", "int8"):
        return precision if graph == "unet" else "fp16"
    return precision


def engine_key(model_dir: str | Path, config: ModelConfig, graph: str, precision: str,
               profile: BatchProfile, target: Target, opset: int) -> EngineKey:
    if precision not in ENGINE_PRECISIONS:
        raise ValueError(f"engine precision must be one of {ENGINE_PRECISIONS}, got {precision!r}")
    spatial = graph_spec(graph, config).inputs
    first = next(iter(spatial.values()))[0]
    return EngineKey(graph, precision, model_hash(model_dir), target.tensorrt_version,
                     target.gpu_name, target.compute_capability,
                     f"{profile.text()}@{first[-2]}x{first[-1]}", opset)


def build_serialized(onnx_file: Path, spec: GraphSpec, profile: BatchProfile,
                     workspace_gib: float | None = None, timing_cache: Path | None = None) -> bytes:
    """Build a serialised engine from an ONNX file with TensorRT's Python API (TensorRT 10.x)."""
    trt = tensorrt_module()
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_file)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse {onnx_file}: {errors}")
    config = builder.create_builder_config()
    if workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    optimisation = builder.create_optimization_profile()
    for name, (shape, _) in spec.inputs.items():
        optimisation.set_shape(name, (profile.min, *shape), (profile.opt, *shape),
                               (profile.max, *shape))
    config.add_optimization_profile(optimisation)
    # The timing cache makes rebuilds (other precisions, new weights) skip most kernel timing.
    old = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = config.create_timing_cache(old)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT failed to build an engine from {onnx_file} (see its log above)")
    if timing_cache is not None:
        data = bytes(cache.serialize())
        atomic_write(timing_cache, lambda tmp: Path(tmp).write_bytes(data))
    return bytes(serialized)


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
             trt.int32: torch.int32, trt.int64: torch.int64, trt.int8: torch.int8,
             trt.bool: torch.bool}
    if dtype not in table:
        raise EngineError(f"engine I/O of type {dtype} is not supported by this runner")
    return table[dtype]


class Engine:
    """A deserialised engine with one execution context; I/O are torch CUDA tensors.

    For CUDA-graph capture, allocate the buffers once (`allocate`) and call `run` once before
    capturing it: TensorRT does its lazy set-up on the first enqueue, which must not be captured.
    """

    def __init__(self, path: str | Path, device: torch.device | str = "cuda"):
        trt = tensorrt_module()
        self.path = Path(path)
        self.device = torch.device(device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self.device):
            self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self.engine is None:
                raise EngineError(f"TensorRT could not load {self.path}; rebuild it with --force")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.batch_range = tuple(self.engine.get_tensor_profile_shape(self.inputs[0], 0)[i][0]
                                 for i in (0, 2))

    def allocate(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Output buffers for inputs of these shapes (e.g. allocated once before a CUDA graph)."""
        for name in self.inputs:
            self.context.set_input_shape(name, tuple(feeds[name].shape))
        return {n: torch.empty(tuple(self.context.get_tensor_shape(n)), dtype=self.dtypes[n],
                               device=self.device) for n in self.outputs}

    def run(self, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        """Enqueue the engine on the current torch stream; inputs must be contiguous, on the device,
        in the engine's dtypes (`__call__` converts)."""
        batch = feeds[self.inputs[0]].shape[0]
        if not self.batch_range[0] <= batch <= self.batch_range[1]:
            raise EngineError(
                f"batch {batch} is outside the profile of {self.path.name} "
                f"({self.batch_range[0]}-{self.batch_range[1]}); rebuild with a larger --max-batch"
            )
        for name in self.inputs:
            tensor = feeds[name]
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise EngineError(f"{self.path.name} rejects input {name} of shape "
                                  f"{tuple(tensor.shape)}")
            self.context.set_tensor_address(name, tensor.data_ptr())
        for name in self.outputs:
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise EngineError(f"TensorRT failed to run {self.path.name}")

    def __call__(self, **feeds: torch.Tensor) -> dict[str, torch.Tensor]:
        missing = set(self.inputs) - set(feeds)
        if missing:
            raise ValueError(f"{self.path.name} needs inputs {sorted(missing)}")
        ready = {n: feeds[n].to(self.device, self.dtypes[n]).contiguous() for n in self.inputs}
        outputs = self.allocate(ready)
        self.run(ready, outputs)
        return outputs


class TensorRTDenoiser:
    """(U [B, 8, h, w] float32, t [B] int64) -> eps [B, 4, h, w] float32: `LatentDenoiser`'s contract."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def __call__(self, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.engine(U=u, t=t.expand(u.shape[0]) if t.dim() == 0 else t)["eps"]


class TensorRTVQGAN:
    """The VQGAN's two inference calls on engines: `encode_latent` (with quantisation) and `decode`."""

    def __init__(self, encoder: Engine, decoder: Engine):
        self.encoder = encoder
        self.decoder = decoder

    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(image=images)["latent"]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latent=latents)["image"]


@dataclass
class Engines:
    """The three engines of a model directory, loaded for one GPU."""

    vqgan: TensorRTVQGAN
    denoiser: TensorRTDenoiser
    paths: dict[str, Path]


def engine_paths(model_dir: str | Path, config: ModelConfig, precision: str,
                 profile: BatchProfile, target: Target,
                 graphs: Sequence[str] = GRAPH_NAMES) -> dict[str, Path]:
    """The cached engine of each graph; EngineError with the build command if any is missing/stale."""
    from .onnx_export import engine_opset

    return {g: find_engine(model_dir, engine_key(model_dir, config, g, precision, profile, target,
                                                 engine_opset(onnx_precision(g, precision))))
            for g in graphs}


def load_engines(model_dir: str | Path, precision: str = "fp16",
                 profile: BatchProfile = BatchProfile(),
                 device: torch.device | str = "cuda") -> Engines:
    """Load the cached engines of a model directory for this GPU and TensorRT version."""
    from ..config import ModelConfig
    from ..modeldir import CONFIG_FILE

    config = ModelConfig.load(Path(model_dir) / CONFIG_FILE)
    paths = engine_paths(model_dir, config, precision, profile, Target.current(device))
    engines = {g: Engine(p, device) for g, p in paths.items()}
    return Engines(TensorRTVQGAN(engines["encoder"], engines["decoder"]),
                   TensorRTDenoiser(engines["unet"]), paths)


Builder = Callable[[Path, GraphSpec, BatchProfile], bytes]


def build_engines(model_dir: str | Path, precision: str, profile: BatchProfile = BatchProfile(),
                  graphs: Sequence[str] = GRAPH_NAMES, force: bool = False,
                  calibration_images: Sequence[str | Path] = (),
                  workspace_gib: float | None = None, builder: Builder | None = None,
                  target: Target | None = None, progress: Callable[[str], None] | None = None,
                  ) -> dict[str, tuple[Path, bool]]:
    """Export what ONNX is missing, then build each graph's engine unless a fresh one is cached.

    Returns graph -> (engine path, whether it was built now). `builder` and `target` replace
    TensorRT and the GPU query (unit tests of the cache logic inject fakes; nothing else should).
    An engine whose ONNX was re-exported in this call is rebuilt too.
    """
    from .. import modeldir
    from .onnx_export import engine_opset, export_model_dir

    if precision not in ENGINE_PRECISIONS:
        raise ValueError(f"engine precision must be one of {ENGINE_PRECISIONS}, got {precision!r}")
    if target is None:
        target = Target.current()
    if builder is None:
        timing = engine_dir(model_dir) / (
            f"timing-{target.gpu_name.replace(' ', '_')}-{target.tensorrt_version}.cache")
        engine_dir(model_dir).mkdir(parents=True, exist_ok=True)

        def builder(onnx_file: Path, spec: GraphSpec, batch: BatchProfile) -> bytes:
            return build_serialized(onnx_file, spec, batch, workspace_gib, timing)

    model = modeldir.load(model_dir)
    results = {}
    for graph in graphs:
        source = onnx_precision(graph, precision)
        if source in ("fp8", "int8"):
            from .quantize import quantized_unet_onnx

            onnx_file, fresh_onnx = quantized_unet_onnx(model_dir, model, source, calibration_images)
        else:
            exported = export_model_dir(model_dir, source, (graph,), model=model,
                                        progress=progress)[0]
            onnx_file, fresh_onnx = exported.path, exported.exported
        spec = graph_spec(graph, model.config)
        key = engine_key(model_dir, model.config, graph, precision, profile, target,
                         engine_opset(source))
        if progress is not None:
            progress(f"{graph}: {precision} engine for {target.gpu_name}")
        results[graph] = ensure_engine(model_dir, key, lambda: builder(onnx_file, spec, profile),
                                       force=force or fresh_onnx)
    return results

