"""The GPU pipeline: CXR images -> soft-tissue images in one CUDA-graph replay per batch.

For each (batch, sampler, steps, offset noise) a `Program` allocates its device buffers once: the
input images, the seeds, the U-Net input U = [x_t | c] [B, 8, h, w], DPM-Solver's previous x0 and
the output images. Its loop encodes the CXR, writes the latent once into channels 4-7 of U, draws
x_T into channels 0-3, then per step calls the runner's U-Net and one fused sampler kernel that
updates U[:, :4] in place (`bsldm_fast.kernels`, the same plans as `kernels.sampling.sample_fused`),
and finally decodes into the output buffer, all on one stream. That loop is captured once into a
CUDA graph (after warm-up on a side stream, the recipe of torch.cuda.graph's documentation) and
replayed: a call copies images and seeds into the static inputs, replays, and copies the output.

`graphs` supplies the capture; tests inject a fake to check the logic on the CPU (`CudaGraphs` is
the real one). The reference is `pipeline.Pipeline` in float32 with the unfused samplers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from .. import kernels
from ..config import ModelConfig
from ..diffusion import SAMPLERS, Schedule, spaced_timesteps
from ..diffusion.noise import seed_tensor
from ..kernels.sampling import ddim_plan, ddpm_plan, dpmpp_plan
from ..pipeline import DEFAULT_SAMPLER, DEFAULT_STEPS
from .runners import Runner

logger = logging.getLogger(__name__)


class Graph(Protocol):
    def replay(self) -> None: ...


class GraphCapture(Protocol):
    """Turns a loop into a replayable graph: `capture(fn)` warms `fn` up and records it."""

    def capture(self, fn: Callable[[], None]) -> Graph: ...


class CudaGraphs:
    """Real capture: `warmup` eager runs on a side stream, then `torch.cuda.graph` records one run.

    The warm-up compiles what compiles lazily (Triton kernels, torch.compile, cuDNN's algorithm
    choice, TensorRT's first-enqueue set-up), none of which may happen during capture.
    """

    def __init__(self, device: torch.device | str = "cuda", warmup: int = 2):
        self.device = torch.device(device)
        self.warmup = warmup

    def capture(self, fn: Callable[[], None]) -> torch.cuda.CUDAGraph:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph


@dataclass(frozen=True)
class ProgramKey:
    batch: int
    sampler: str
    steps: int
    offset: float
    """Offset-noise coefficient of x_T (0: plain Gaussian noise)."""


class Program:
    """The static buffers and the sampling loop of one `ProgramKey` (see the module docstring)."""

    def __init__(self, key: ProgramKey, config: ModelConfig, schedule: Schedule, runner: Runner,
                 device: torch.device, step_backend: str, codes: torch.Tensor | None = None):
        self.key = key
        self.runner = runner
        self.backend = step_backend
        self.codes = codes
        """The codebook when the sampled latent is quantised before decoding (quantize_sample)."""
        self.channels = config.diffusion.latent_channels
        b, c, h, s = key.batch, self.channels, config.latent_size, config.image_size
        timesteps = spaced_timesteps(schedule.num_timesteps, key.steps)
        if key.sampler == "ddpm":
            self.plan = ddpm_plan(schedule, timesteps)
        elif key.sampler == "ddim":
            self.plan = ddim_plan(schedule, timesteps)
        else:
            self.plan = dpmpp_plan(schedule, timesteps)
        self.images = torch.zeros((b, config.vqgan.in_channels, s, s), device=device)
        self.seeds = torch.zeros(b, dtype=torch.int64, device=device)
        self.u = torch.zeros((b, 2 * c, h, h), device=device)
        self.x0 = torch.zeros((b, c, h, h), device=device) if key.sampler == "dpmpp" else None
        # One contiguous [B] row of timesteps per step (TensorRT wants contiguous inputs).
        self.timesteps = torch.tensor(timesteps, dtype=torch.int64, device=device).view(-1, 1).repeat(1, b)
        self.out = torch.zeros((b, config.vqgan.out_channels, s, s), device=device)
        if codes is not None:
            self.quantized = torch.zeros((b, c, h, h), device=device)
            self.indices = torch.zeros((b, h, h), dtype=torch.int64, device=device)
        self.graph: Graph | None = None

    def buffers(self) -> dict[str, torch.Tensor]:
        """The static tensors (what a graph replay reads and writes)."""
        named = {"images": self.images, "seeds": self.seeds, "u": self.u, "timesteps": self.timesteps,
                 "out": self.out}
        if self.x0 is not None:
            named["x0"] = self.x0
        return named

    def loop(self) -> None:
        """images, seeds -> out: the whole sampling loop on the static buffers, no host sync."""
        c = self.channels
        self.u[:, c:].copy_(self.runner.encode(self.images))  # the condition is written once
        x = self.u[:, :c]
        kernels.initial_latent(self.seeds, self.key.offset, x, self.backend)
        for i, p in enumerate(self.plan):
            eps = self.runner.denoise(self.u, self.timesteps[i])
            if self.key.sampler == "ddpm":
                kernels.ddpm_step(x, eps, self.seeds, i, p, x, 0.0, self.backend)
            elif self.key.sampler == "ddim":
                kernels.ddim_step(x, eps, self.seeds, i, p, x, 0.0, self.backend)
            else:
                kernels.dpmpp_2m_step(x, eps, self.x0 if i else None, p, x, self.x0, self.backend)
        if self.codes is not None:
            x = kernels.vq_quantize(x, self.codes, self.quantized, self.indices, self.backend)[0]
        self.out.copy_(self.runner.decode(x))


class GraphPipeline:
    """`Pipeline.run`'s contract on a network runner, each batch shape captured once and replayed.

    A batch smaller than one already captured (with the same sampler and steps) is padded into it.

    `graphs=None` runs the loop eagerly on the same static buffers (the un-captured reference of
    the capture logic); the default captures CUDA graphs, which needs a CUDA device.
    """

    def __init__(self, config: ModelConfig, runner: Runner, device: torch.device | str = "cuda",
                 step_backend: str = "auto", graphs: GraphCapture | None | str = "cuda",
                 codes: torch.Tensor | None = None):
        if config.diffusion.quantize_sample and codes is None:
            raise ValueError("config.diffusion.quantize_sample needs the VQGAN codebook (codes)")
        self.config = config
        self.codes = (codes.detach().float().to(device).contiguous()
                      if config.diffusion.quantize_sample else None)
        self.runner = runner
        self.device = torch.device(device)
        self.precision = runner.precision
        self.step_backend = kernels.resolve(step_backend, self.device)
        if graphs == "cuda":
            if self.device.type != "cuda":
                raise ValueError("CUDA graphs need a CUDA device; pass graphs=None to run uncaptured")
            graphs = CudaGraphs(self.device)
        self.graphs = graphs
        self.schedule = Schedule.from_config(config.diffusion)
        self.programs: dict[ProgramKey, Program] = {}

    def program(self, batch: int, sampler: str = DEFAULT_SAMPLER, steps: int | None = None,
                offset_noise: bool = False) -> Program:
        """The program of this batch shape, built (and captured) on first use."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
        steps = DEFAULT_STEPS[sampler] if steps is None else int(steps)
        offset = self.config.diffusion.offset_noise_coefficient if offset_noise else 0.0
        key = ProgramKey(batch, sampler, steps, offset)
        program = self.programs.get(key)
        if program is None:
            program = Program(key, self.config, self.schedule, self.runner, self.device,
                              self.step_backend, self.codes)
            if self.graphs is not None:
                logger.info("capturing a CUDA graph for %s", key)
                with torch.inference_mode():
                    program.graph = self.graphs.capture(program.loop)
            self.programs[key] = program
        return program

    @torch.inference_mode()
    def run(self, images: torch.Tensor, seeds: Sequence[int], sampler: str = DEFAULT_SAMPLER,
            steps: int | None = None, offset_noise: bool = False,
            progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """CXR images [B, 1, S, S] in [-1, 1] -> soft-tissue images [B, 1, S, S] (unclamped).

        `progress` is accepted for `Pipeline.run`'s signature; a replay has no steps to report.
        """
        size = self.config.image_size
        if images.dim() != 4 or images.shape[1] != 1 or tuple(images.shape[2:]) != (size, size):
            raise ValueError(f"expected images of shape [B, 1, {size}, {size}], got {tuple(images.shape)}")
        if len(seeds) != images.shape[0]:
            raise ValueError(f"{len(seeds)} seeds for a batch of {images.shape[0]}")
        batch = images.shape[0]
        program = self._larger(batch, sampler, steps, offset_noise) or self.program(
            batch, sampler, steps, offset_noise)
        # A smaller batch runs in a larger program, padded: every sample depends only on its own
        # image and seed, and padding costs less than compiling and capturing another graph.
        program.images[:batch].copy_(images)
        program.images[batch:].zero_()
        program.seeds.zero_()
        program.seeds[:batch].copy_(seed_tensor(seeds, self.device))
        if program.graph is not None:
            program.graph.replay()
        else:
            program.loop()
        return program.out[:batch].clone()

    def _larger(self, batch: int, sampler: str, steps: int | None, offset_noise: bool) -> Program | None:
        """The smallest existing program of these settings with at least `batch` samples."""
        steps = DEFAULT_STEPS.get(sampler, 0) if steps is None else int(steps)
        offset = self.config.diffusion.offset_noise_coefficient if offset_noise else 0.0
        fits = [p for k, p in self.programs.items()
                if (k.sampler, k.steps, k.offset) == (sampler, steps, offset) and k.batch >= batch]
        return min(fits, key=lambda p: p.key.batch) if fits else None


# Choosing what runs the networks --------------------------------------------------------------

BACKENDS = ("auto", "tensorrt", "torch-compile", "torch")
"""'tensorrt': cached engines in the graph pipeline; 'torch-compile': torch.compile'd networks in the
graph pipeline (CUDA); 'torch': eager networks, in the graph pipeline on CUDA and in
`pipeline.Pipeline` on the CPU; 'auto': TensorRT when it and the engines are there, else
torch-compile on CUDA, else the CPU path."""


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
    if backend == "torch-compile" and device.type != "cuda":
        raise ValueError("backend 'torch-compile' compiles the networks into the CUDA-graph "
                         f"pipeline and needs a CUDA device, not {device}; use backend 'torch'")
    return backend


def build_pipeline(config: ModelConfig, vqgan, unet, device: torch.device, precision: str,
                   backend: str = "auto", model_dir: str | Path | None = None,
                   compile_mode: str = "default"):
    """(pipeline, chosen backend): a `GraphPipeline` on CUDA, `pipeline.Pipeline` on the CPU; both
    have `run(images, seeds, sampler, steps, offset_noise)`."""
    from ..pipeline import Pipeline
    from .runners import TensorRTRunner, TorchRunner

    device = torch.device(device)
    chosen = choose_backend(backend, device,
                            lambda: tensorrt_unavailable(model_dir, precision, device))
    if device.type != "cuda":
        return Pipeline(config, vqgan, unet, device, precision), chosen
    if chosen == "tensorrt":
        runner: Runner = TensorRTRunner(model_dir, precision, device)
    else:
        runner = TorchRunner(config, vqgan, unet, device, precision,
                             compile=chosen == "torch-compile", compile_mode=compile_mode)
    return GraphPipeline(config, runner, device, codes=vqgan.quantizer.embedding.weight), chosen
