"""The tensor pipeline: CXR images in [-1, 1] -> soft-tissue images in [-1, 1], on any device.

encode the CXR once -> sample the soft-tissue latent conditioned on it -> decode. It knows tensors
only; files and intensity mapping live in `io` and `preprocess`.

One pipeline serves the CPU and the GPU. For each (batch, sampler, steps, offset noise) a
`Program` allocates its buffers once: the input images, the sampler's `kernels.sampling.Buffers`
(seeds, U = [x_t | c], timesteps, DPM-Solver's previous x0) and the output images. Its loop runs
the runner's encoder into U[:, 4:], `kernels.sampling.run` (the one sampling loop: the runner's
U-Net and one fused kernel per step, updating U[:, :4] in place), and the runner's decoder into
the output. On CUDA that loop is captured once into a CUDA graph (after warm-up on a side
stream, the recipe of torch.cuda.graph's documentation) and replayed; on the CPU it runs as is.

What runs the networks is a runner (engines/runners.py: eager torch, torch.compile, TensorRT);
`Pipeline.create` builds one with `make_runner`, the factory that owns precision and memory layout.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from . import kernels
from .config import ModelConfig
from .diffusion import Schedule
from .diffusion.noise import seed_tensor
from .diffusion.plan import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS, Plan, make_plan, resolve_steps
from .engines import tuning
from .engines.runners import (INT8_BACKENDS, Runner, choose_backend, make_runner, make_stage_runner,
                              tensorrt_unavailable)
from .kernels.sampling import Buffers, run
from .models import VQGAN, UNet
from .precision import PRECISIONS

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_SAMPLER", "DEFAULT_STEPS", "PRECISIONS", "SAMPLERS", "STEP_BACKENDS", "CudaGraphs",
           "Pipeline", "Program", "ProgramKey", "build_pipeline"]

STEP_BACKENDS = kernels.BACKENDS
"""'reference': the PyTorch kernels (diffusion/samplers.py's updates), the specification; 'auto',
'cpp', 'cuda', 'triton': the fused kernels of bsldm_fast.kernels ('auto' picks the best available)."""


def _check_step_backend(step_backend: str) -> None:
    if step_backend not in STEP_BACKENDS:
        raise ValueError(f"unknown step_backend {step_backend!r}; choose one of {STEP_BACKENDS}")


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
        if self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {self.device}; pass graphs=None")
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
    """The buffers and the loop of one `ProgramKey` (see the module docstring)."""

    def __init__(self, key: ProgramKey, plan: Plan, config: ModelConfig, runner: Runner,
                 device: torch.device, step_backend: str, codes: torch.Tensor | None = None):
        self.key = key
        self.plan = plan
        self.runner = runner
        self.backend = step_backend
        self.codes = codes
        """The codebook when the sampled latent is quantised before decoding (quantize_sample)."""
        b, c, h, s = key.batch, config.diffusion.latent_channels, config.latent_size, config.image_size
        self.images = torch.zeros((b, config.vqgan.in_channels, s, s), device=device)
        self.sampling = Buffers.allocate(plan, b, (c, h, h), device)
        self.out = torch.zeros((b, config.vqgan.out_channels, s, s), device=device)
        if codes is not None:
            self.quantized = torch.zeros((b, c, h, h), device=device)
            self.indices = torch.zeros((b, h, h), dtype=torch.int64, device=device)
        self.graph: Graph | None = None

    @property
    def seeds(self) -> torch.Tensor:
        return self.sampling.seeds

    def buffers(self) -> dict[str, torch.Tensor]:
        """The static tensors (what a graph replay reads and writes)."""
        s = self.sampling
        named = {"images": self.images, "seeds": s.seeds, "u": s.u, "timesteps": s.timesteps, "out": self.out}
        if s.x0 is not None:
            named["x0"] = s.x0
        return named

    def loop(self, progress: Callable[[int], None] | None = None) -> None:
        """images, seeds -> out on the static buffers, with no host synchronisation."""
        c = self.sampling.channels
        self.sampling.u[:, c:].copy_(self.runner.encode(self.images))  # the condition is written once
        x = run(self.plan, self.runner.denoise, self.sampling, self.key.offset, self.backend, progress)
        if self.codes is not None:
            x = kernels.vq_quantize(x, self.codes, self.quantized, self.indices, self.backend)[0]
        self.out.copy_(self.runner.decode(x))


class Pipeline:
    """A model on one device behind a runner, ready to sample: `run(images, seeds, ...)`.

    `step_backend` picks the sampler kernels: fused ('auto', 'cpp', 'cuda', 'triton'; see
    bsldm_fast.kernels) or the PyTorch reference ('reference'). All draw the same Philox noise,
    so they agree to float32 rounding.

    `graphs` captures each program's loop (`CudaGraphs` on CUDA; tests inject a fake); None runs
    it as is, which is the CPU path. With capture, a batch smaller than one already captured (same
    sampler and steps) is padded into it; without, every batch size gets its own program. At most
    `max_programs` are kept, the least recently used dropped first: each holds its buffers and,
    captured, a CUDA graph.
    """

    def __init__(self, config: ModelConfig, runner: Runner, device: torch.device | str = "cpu",
                 step_backend: str = "auto", graphs: GraphCapture | None = None, max_programs: int = 8):
        _check_step_backend(step_backend)
        self.config = config
        self.runner = runner
        self.device = torch.device(device)
        self.precision = runner.precision
        self.step_backend = kernels.resolve(step_backend, self.device)
        """The kernel backend: 'reference', or what 'auto' resolved to on this device."""
        self.codes = runner.codes if config.diffusion.quantize_sample else None
        if config.diffusion.quantize_sample and self.codes is None:
            raise ValueError("config.diffusion.quantize_sample needs a runner with the codebook (codes)")
        self.graphs = graphs
        self.schedule = Schedule.from_config(config.diffusion)
        self.max_programs = max_programs
        self.programs: OrderedDict[ProgramKey, Program] = OrderedDict()

    @classmethod
    def create(cls, config: ModelConfig, vqgan: VQGAN, unet: UNet, device: torch.device | str = "cpu",
               precision: str = "fp32", step_backend: str = "auto", *, backend: str = "torch",
               graphs: GraphCapture | None | str = "auto", model_dir: str | Path | None = None,
               compile_mode: str = "default", freeze: Collection[str] = ()) -> "Pipeline":
        """A pipeline on the runner `make_runner` builds for `backend` ('torch', 'torch-compile',
        'tensorrt'). `graphs='auto'` captures CUDA graphs on CUDA and nothing on the CPU."""
        _check_step_backend(step_backend)
        device = torch.device(device)
        runner = make_runner(config, vqgan, unet, device, precision, backend, step_backend=step_backend,
                             model_dir=model_dir, compile_mode=compile_mode, freeze=freeze)
        if graphs == "auto":
            graphs = CudaGraphs(device) if device.type == "cuda" else None
        return cls(config, runner, device, step_backend, graphs)

    @property
    def denoiser(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """(U, t) -> eps: the runner's U-Net with the conditioning rule."""
        return self.runner.denoise

    def plan(self, sampler: str = DEFAULT_SAMPLER, steps: int | None = None) -> Plan:
        return make_plan(sampler, self.schedule, steps)

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """CXR images [B, 1, S, S] in [-1, 1] -> quantised latents [B, 4, S/8, S/8]."""
        return self.runner.encode(images.to(self.device))

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Each latent vector of z [B, 4, h, w] (float32) replaced by its nearest code."""
        codes = self.runner.codes
        if codes is None:
            raise ValueError(f"the {self.runner.name} runner has no codebook")
        return kernels.vq_quantize(z, codes, backend=self.step_backend)[0]

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images [B, 1, S, S], float32; like the original, sampled latents are decoded
        unquantised unless `config.diffusion.quantize_sample` (applied in `run`)."""
        return self.runner.decode(latents.to(self.device))

    @torch.inference_mode()
    def sample_latents(self, cond: torch.Tensor, seeds: Sequence[int], sampler: str = DEFAULT_SAMPLER,
                       steps: int | None = None, offset_noise: bool = False,
                       progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Soft-tissue latents for CXR latents `cond`, one seed per sample (uncaptured)."""
        if len(seeds) != cond.shape[0]:
            raise ValueError(f"{len(seeds)} seeds for a batch of {cond.shape[0]}")
        plan = self.plan(sampler, steps)
        buffers = Buffers.allocate(plan, cond.shape[0], tuple(cond.shape[1:]), self.device)
        buffers.u[:, buffers.channels:].copy_(cond)
        buffers.seeds.copy_(seed_tensor(seeds, self.device))
        return run(plan, self.runner.denoise, buffers, self._offset(offset_noise), self.step_backend,
                   progress).clone()

    def _offset(self, offset_noise: bool) -> float:
        return self.config.diffusion.offset_noise_coefficient if offset_noise else 0.0

    def program(self, batch: int, sampler: str = DEFAULT_SAMPLER, steps: int | None = None,
                offset_noise: bool = False) -> Program:
        """The program of this batch shape, built (and captured) on first use."""
        key = ProgramKey(batch, sampler, resolve_steps(sampler, steps), self._offset(offset_noise))
        program = self.programs.get(key)
        if program is None:
            program = Program(key, self.plan(sampler, key.steps), self.config, self.runner, self.device,
                              self.step_backend, self.codes)
            if self.graphs is not None:
                logger.info("capturing a CUDA graph for %s", key)
                with torch.inference_mode():
                    program.graph = self.graphs.capture(program.loop)
            self.programs[key] = program
            while len(self.programs) > self.max_programs:
                self.programs.popitem(last=False)
        self.programs.move_to_end(key)
        return program

    @torch.inference_mode()
    def run(self, images: torch.Tensor, seeds: Sequence[int], sampler: str = DEFAULT_SAMPLER,
            steps: int | None = None, offset_noise: bool = False,
            progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """CXR images [B, 1, S, S] in [-1, 1] -> soft-tissue images [B, 1, S, S] (unclamped).

        `progress(i)` is called after each step when the loop is not captured (a replay has no
        steps to report).
        """
        size = self.config.image_size
        if images.dim() != 4 or images.shape[1] != 1 or tuple(images.shape[2:]) != (size, size):
            raise ValueError(f"expected images of shape [B, 1, {size}, {size}], got {tuple(images.shape)}")
        if len(seeds) != images.shape[0]:
            raise ValueError(f"{len(seeds)} seeds for a batch of {images.shape[0]}")
        batch = images.shape[0]
        program = self._larger(batch, sampler, steps, offset_noise) or self.program(
            batch, sampler, steps, offset_noise)
        # A smaller batch runs in a larger captured program, padded: every sample depends only on
        # its own image and seed, and padding costs less than capturing another graph.
        program.images[:batch].copy_(images)
        program.images[batch:].zero_()
        program.seeds.zero_()
        program.seeds[:batch].copy_(seed_tensor(seeds, self.device))
        if program.graph is not None:
            program.graph.replay()
        else:
            program.loop(progress)
        return program.out[:batch].clone()

    def _larger(self, batch: int, sampler: str, steps: int | None, offset_noise: bool) -> Program | None:
        """With capture: the smallest existing program of these settings with at least `batch` samples."""
        if self.graphs is None:
            return None
        steps = resolve_steps(sampler, steps)
        offset = self._offset(offset_noise)
        fits = [p for k, p in self.programs.items()
                if (k.sampler, k.steps, k.offset) == (sampler, steps, offset) and k.batch >= batch]
        if not fits:
            return None
        program = min(fits, key=lambda p: p.key.batch)
        self.programs.move_to_end(program.key)
        return program


def build_pipeline(config: ModelConfig, vqgan: VQGAN, unet: UNet, device: torch.device | str,
                   precision: str, backend: str = "auto", model_dir: str | Path | None = None,
                   compile_mode: str = "default") -> tuple[Pipeline, str]:
    """(pipeline, chosen backend) for a user's choice of backend. 'auto': on CUDA, TensorRT when it
    and the engines are there, else torch-compile; on the CPU, each network on its fastest checked
    runner from the table `bsldm-fast tune` measured on this CPU (engines/tuning.py), else eager
    torch. `precision` 'int8' (CPU only; backend 'auto' or 'openvino'): the int8 networks that passed
    the model's quality gate (engines/int8.py), bf16 for the rest; 'auto' without a table runs
    OpenVINO."""
    device = torch.device(device)
    if precision == "int8" and (device.type != "cpu" or backend not in ("auto", *INT8_BACKENDS)):
        raise ValueError("precision 'int8' is the quality-gated int8 networks of OpenVINO on the CPU: "
                         f"pass device 'cpu' and backend 'auto' or {' or '.join(map(repr, INT8_BACKENDS))}")
    if backend == "auto" and device.type == "cpu":
        choice = tuning.fastest(model_dir, precision)
        if choice is not None:
            runner = make_stage_runner(config, vqgan, unet, choice, device, precision, model_dir=model_dir)
            return Pipeline(config, runner, device), runner.name
        fallback = INT8_BACKENDS[0] if precision == "int8" else "torch"
        logger.info("no CPU backend table for this CPU, model and precision %s: %s "
                    "(`bsldm-fast tune MODEL_DIR --precision %s` measures one)", precision, fallback, precision)
        backend = fallback
    chosen = choose_backend(backend, device, lambda: tensorrt_unavailable(model_dir, precision, device))
    pipeline = Pipeline.create(config, vqgan, unet, device, precision, backend=chosen, model_dir=model_dir,
                               compile_mode=compile_mode)
    return pipeline, chosen
