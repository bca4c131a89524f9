"""Runners: what runs the three networks of a pipeline, built by one factory (`make_runner`).

A runner has three calls with float32 I/O, the contracts of `models.latent` and of the exported
graphs (engines/graphs.py):

- `encode(images [B, 1, S, S]) -> quantised CXR latent [B, 4, h, w]`;
- `denoise(U [B, 8, h, w], t [B] int64) -> eps [B, 4, h, w]` (conditioning rule inside);
- `decode(latent [B, 4, h, w]) -> image [B, 1, S, S]`.

So `pipeline.Pipeline` has one code path whatever runs the networks; a new backend is one new
runner class and one branch of `make_runner`. The factory owns precision and memory layout. On
CUDA every call must be capturable in a CUDA graph after one warm-up call: no host
synchronisation, no host-to-device copies.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from .. import kernels
from ..config import ModelConfig
from ..models import VQGAN, UNet
from ..models.latent import LatentDecoder, LatentDenoiser, LatentEncoder
from ..precision import dtype_of, on_device
from .graphs import BatchProfile

logger = logging.getLogger(__name__)

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
"""torch.compile modes that leave CUDA graphs to the pipeline: 'reduce-overhead' and
'max-autotune' capture their own graphs, which cannot nest inside the pipeline's capture."""

NETWORKS = ("encoder", "unet", "decoder")


class Runner(Protocol):
    """What `pipeline.Pipeline` calls (see the module docstring)."""

    name: str
    precision: str
    codes: torch.Tensor | None
    """The float32 codebook [K, 4] on the device, for quantising sampled latents."""

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def denoise(self, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


class _Compiled:
    """torch.compile of a module, with inductor's `freezing` as asked. Set around each call rather
    than globally, because dynamo reads it while tracing (torch.compile's `options` come too late
    for that) and because it must differ between modules."""

    def __init__(self, module: nn.Module, mode: str, freezing: bool):
        from torch._inductor import config as inductor_config

        self.compiled = torch.compile(module, mode=mode, dynamic=False)
        self.patch = functools.partial(inductor_config.patch, freezing=freezing)

    def __call__(self, *args):
        with self.patch():
            return self.compiled(*args)


class TorchRunner:
    """The networks as PyTorch modules in `precision`, eager or compiled, on the CPU or CUDA.

    In reduced precision the VQGAN's encoder and decoder run in it too (at 1024² each costs more
    than five U-Net steps) and every weight is channels-last, the layout of oneDNN's and cuDNN's
    fast bf16/fp16 convolutions. The codebook stays float32: the nearest-code search
    (`kernels.vq_quantize` on `step_backend`) decides near-ties as fp32 does, up to the encoder's
    rounding.

    `compile=True` wraps each network in `torch.compile(mode=compile_mode, dynamic=False)`: one
    compilation per batch size, done by the first call. `freeze` names the networks whose weights
    inductor may freeze (prepacked for oneDNN on the CPU).
    """

    def __init__(self, config: ModelConfig, vqgan: VQGAN, unet: UNet,
                 device: torch.device | str = "cpu", precision: str = "fp32",
                 step_backend: str = "auto", compile: bool = False, compile_mode: str = "default",
                 freeze: Collection[str] = ()):
        dtype = dtype_of(precision)
        if compile and compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {compile_mode!r} "
                             "(the pipeline captures its own CUDA graph)")
        unknown = set(freeze) - set(NETWORKS)
        if unknown:
            raise ValueError(f"freeze names unknown networks {sorted(unknown)}; choose from {NETWORKS}")
        self.device = torch.device(device)
        self.precision = precision
        self.name = "torch-compile" if compile else "torch"
        self.step_backend = kernels.resolve(step_backend, self.device)
        channels_last = dtype != torch.float32
        layout = torch.channels_last if channels_last else torch.contiguous_format
        networks = {"encoder": vqgan.encoder, "unet": unet, "decoder": vqgan.decoder}
        converted = {}
        for name, original in networks.items():
            module = on_device(original, self.device, dtype)
            if channels_last:
                # The layout change is in place: never on the caller's own modules.
                module = (copy.deepcopy(module) if module is original else module).to(
                    memory_format=torch.channels_last)
            converted[name] = module
        self.codes = vqgan.quantizer.embedding.weight.detach().to(self.device, torch.float32).contiguous()
        self.modules = {
            "encoder": LatentEncoder(converted["encoder"], layout).eval(),
            "unet": LatentDenoiser(converted["unet"], config, layout).eval(),
            "decoder": LatentDecoder(converted["decoder"], layout).eval(),
        }
        self._calls: dict[str, Callable] = {
            name: (_Compiled(module, compile_mode, name in freeze) if compile else module)
            for name, module in self.modules.items()}

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        z = self._calls["encoder"](images)
        return kernels.vq_quantize(z, self.codes, backend=self.step_backend)[0]

    def denoise(self, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self._calls["unet"](u, t)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._calls["decoder"](latents)


class TensorRTRunner:
    """The three cached TensorRT engines of a model directory (`tensorrt.load_engines`).

    TensorRT does its lazy set-up on an engine's first enqueue; the pipeline's warm-up call does
    that before capture.
    """

    def __init__(self, model_dir: str | Path, precision: str = "fp16",
                 device: torch.device | str = "cuda", profile: BatchProfile = BatchProfile(),
                 codes: torch.Tensor | None = None):
        from .tensorrt import load_engines

        self.name = "tensorrt"
        self.precision = precision
        self.device = torch.device(device)
        self.engines = load_engines(model_dir, precision, profile, self.device)
        self.codes = None if codes is None else codes.detach().to(self.device, torch.float32).contiguous()
        """The codebook, for quantising sampled latents (`diffusion.quantize_sample`)."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.engines.vqgan.encode_latent(images)

    def denoise(self, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.engines.denoiser(u, t)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.engines.vqgan.decode(latents)


class StageRunner:
    """Each network on the runner of its own backend: what `backend="auto"` builds on the CPU from
    the table `bsldm-fast tune` measured (engines/tuning.py)."""

    def __init__(self, runners: dict[str, Runner]):
        missing = set(NETWORKS) - set(runners)
        if missing:
            raise ValueError(f"no runner for {sorted(missing)}")
        self.runners = runners
        self.name = ",".join(f"{network}={runners[network].name}" for network in NETWORKS)
        self.precision = runners["unet"].precision
        self.codes = next((r.codes for r in runners.values() if r.codes is not None), None)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.runners["encoder"].encode(images)

    def denoise(self, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.runners["unet"].denoise(u, t)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.runners["decoder"].decode(latents)


def make_stage_runner(config: ModelConfig, vqgan: VQGAN, unet: UNet, choice: dict[str, str],
                      device: torch.device | str = "cpu", precision: str = "fp32", *,
                      step_backend: str = "auto", model_dir: str | Path | None = None) -> StageRunner:
    """A `StageRunner` with network -> backend `choice`; one runner per distinct backend. At
    precision 'int8' the 'openvino' runner runs its quality-gated int8 networks and every other
    runner bf16 (`runner_precision`)."""
    built = {backend: make_runner(config, vqgan, unet, device, runner_precision(backend, precision), backend,
                                  step_backend=step_backend, model_dir=model_dir,
                                  freeze=("unet",) if backend == "torch-compile" else ())
             for backend in sorted(set(choice.values()))}
    return StageRunner({network: built[choice[network]] for network in NETWORKS})


INT8_BACKENDS = ("openvino",)
"""The runners with int8 networks (engines/int8.py: NNCF-quantised OpenVINO IRs behind a quality gate)."""


def runner_precision(backend: str, precision: str) -> str:
    """The precision `backend` runs when the pipeline's precision is `precision`: 'int8' means the
    gated int8 networks where a runner has them (INT8_BACKENDS) and bf16 on every other runner."""
    if precision == "int8" and backend not in INT8_BACKENDS:
        return "bf16"
    return precision


def backend_unavailable(backend: str, device: torch.device) -> str | None:
    """Why a runner backend cannot run on `device` (None: it can), TensorRT aside (its engines
    belong to a model directory: `tensorrt_unavailable`)."""
    if backend == "torch":
        return None
    if backend == "torch-compile":
        try:
            import torch._inductor  # noqa: F401
        except Exception as error:  # noqa: BLE001 - any import failure means no inductor
            return f"torch inductor is unavailable: {error}"
        return None
    if backend == "openvino":
        from .openvino import openvino_unavailable

        return openvino_unavailable(device)
    return f"unknown backend {backend!r}"


def make_runner(config: ModelConfig, vqgan: VQGAN, unet: UNet, device: torch.device | str = "cpu",
                precision: str = "fp32", backend: str = "torch", *, step_backend: str = "auto",
                model_dir: str | Path | None = None, compile_mode: str = "default",
                freeze: Collection[str] = ()) -> Runner:
    """The runner of `backend` ('torch', 'torch-compile', 'tensorrt' or 'openvino'; not 'auto', see
    `choose_backend`): the one place that decides how the networks run."""
    if backend in ("torch", "torch-compile"):
        return TorchRunner(config, vqgan, unet, device, precision, step_backend,
                           compile=backend == "torch-compile", compile_mode=compile_mode, freeze=freeze)
    if backend == "tensorrt":
        if model_dir is None:
            raise ValueError("TensorRT engines belong to a model directory: pass model_dir")
        return TensorRTRunner(model_dir, precision, device, codes=vqgan.quantizer.embedding.weight)
    if backend == "openvino":
        from .openvino import OpenVINORunner

        return OpenVINORunner(config, vqgan, unet, precision, model_dir, device, step_backend)
    raise ValueError(f"unknown runner backend {backend!r}; choose one of {BACKENDS[1:]}")


# Choosing what runs the networks --------------------------------------------------------------

BACKENDS = ("auto", "tensorrt", "torch-compile", "torch", "openvino")
"""'tensorrt': cached engines (CUDA); 'torch-compile': torch.compile'd networks; 'torch': eager
networks; 'openvino': OpenVINO-compiled networks on the CPU. On CUDA the pipeline captures its loop
in a CUDA graph. 'auto': on CUDA TensorRT when it and the engines are there, else torch-compile; on
the CPU each network on its fastest checked runner from `bsldm-fast tune`'s table, else torch."""


def tensorrt_unavailable(model_dir: str | Path | None, precision: str, device: torch.device,
                         target=None) -> str | None:
    """Why cached TensorRT engines cannot run here (naming the command that builds missing or stale
    ones), or None when they can. `target` replaces the GPU query (tests)."""
    from ..modeldir import CONFIG_FILE
    from .cache import ENGINE_PRECISIONS, EngineError
    from .graphs import BatchProfile
    from .tensorrt import Target, engine_paths

    if model_dir is None:
        return "TensorRT engines belong to a model directory, and this model has none"
    if device.type != "cuda":
        return f"TensorRT runs on an NVIDIA GPU, not on {device}"
    if precision not in ENGINE_PRECISIONS:
        return (f"there are no {precision} TensorRT engines (engines are "
                f"{'/'.join(ENGINE_PRECISIONS)}): pass precision 'fp16' or 'bf16'")
    try:
        target = Target.current(device) if target is None else target
        config = ModelConfig.load(Path(model_dir) / CONFIG_FILE)
        engine_paths(model_dir, config, precision, BatchProfile(), target)
    except EngineError as error:
        return str(error)
    return None


def choose_backend(backend: str, device: torch.device,
                   tensorrt_reason: Callable[[], str | None]) -> str:
    """The backend that `backend` means on `device`; `tensorrt_reason()` says why TensorRT cannot run
    (None: it can). An explicit choice that cannot run raises, with the reason."""
    from .cache import EngineError

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        reason = tensorrt_reason()
        if reason is None:
            return "tensorrt"
        logger.info("not using TensorRT: %s", reason)
        return "torch-compile"
    if backend == "tensorrt":
        reason = tensorrt_reason()
        if reason is not None:
            raise EngineError(f"backend 'tensorrt' cannot run: {reason}")
    if backend in ("torch-compile", "openvino"):
        reason = backend_unavailable(backend, device)
        if reason is not None:
            raise EngineError(f"backend {backend!r} cannot run: {reason}")
    return backend
