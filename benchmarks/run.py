"""The yardstick: every stage x backend x size, against the original-style loop and the machine's
measured matmul peak, in one run.

    python benchmarks/run.py [--quick | --smoke] [--device cpu|cuda] [--tag dev] [--compile]
                             [--configs small,paper] [--backends a,b] [--only stage,stage] [--no-scaling]

Prints a table as it goes and writes a JSON and a scaling plot (.png) beside it:
benchmarks/results/<machine>-<date>[-quick|-smoke][-partial][-<tag>].json (`-partial`: --only,
--configs, --backends or --no-scaling). An earlier result of the same name is kept (the new one gets `-2`, `-3`, ...). Weights are random: speed does not depend on them. Rows are a registry of
`Scenario`s; a new backend or stage only adds entries to `BACKENDS` / `STAGES` / `scenarios()`.
Backends that are not present here (fused kernels, TensorRT, OpenVINO, a GPU) are listed as skipped,
with why.

On the CPU the same run also times the CPU engines at batch 1, each stage checked before it is
timed: ours (`openvino` fp32/bf16/int8: bsldm_fast's OpenVINO runner; eager torch and torch-compile
bf16) and peers (`onnxruntime` fp32, `openvino-default` bf16: benchmarks/engine_peers.py), every row
marked ours or peer (`kind`), with GFLOP/s and its share of the GEMM rate of its precision measured
in the same run (int8 rows: of the int8 GEMM rate, in 2*M*N*K ops/s, and of the bf16 one). Then end
to end on `cpu-best`: each stage on the fastest checked row of ours measured earlier in the run
(bf16; int8 picks among the int8 and bf16 rows), as `backend="auto"` would run it. The CPU paths
alone, at paper size:

    python benchmarks/run.py --configs paper --only vq-encode,unet-step,vq-decode,end-to-end --no-scaling
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import gc
import json
import resource
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from checks import Check, check_codes, check_finite, check_output, tolerances  # noqa: E402
from original_style import OriginalStyle  # noqa: E402
from engine_peers import (OnnxRuntimePeer, OpenVINOPeer, RunnerWith, onnx_graphs, onnxruntime_unavailable,  # noqa: E402
                   openvino_peer_unavailable)
from timing import (Row, Timing, int8_gemm_peak, machine, machine_slug, matmul_peak, measure,  # noqa: E402
                    unet_flops, vqgan_flops, write_results)

from bsldm_fast.config import ModelConfig, preset  # noqa: E402
from bsldm_fast.modeldir import Model, random_model  # noqa: E402
from bsldm_fast.pipeline import DEFAULT_SAMPLER, PRECISIONS, Pipeline  # noqa: E402
from bsldm_fast.pipeline import DEFAULT_STEPS as PIPELINE_STEPS  # noqa: E402
from bsldm_fast.engines.runners import StageRunner, backend_unavailable, make_runner  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
STAGE_ORDER = ("vq-encode", "unet-step", "sampler-step", "vq-decode", "end-to-end")
DEFAULT_STEPS = PIPELINE_STEPS[DEFAULT_SAMPLER]
"""The few-step sampler the targets are stated for: the Pipeline's default."""
SAMPLER_STEP_FLOPS = {"ddpm": 12, "ddim": 10, "dpmpp": 12, "original": 12}
"""Element-wise FLOPs per latent element of one sampler update, by formula (x0, clip, update, noise):
the step is memory-bound, so its rate is far below any matmul peak by nature."""


@dataclass(frozen=True)
class Scenario:
    """One row to measure."""

    stage: str
    backend: str
    precision: str
    config: str
    batch: int = 1
    resolution: int = 0
    """Image size; 0 means the preset's."""
    sampler: str = "-"
    steps: int = 0
    group: str = "stages"
    heavy: bool = False
    """Seconds per call at least: warm-up and repeats are cut (see `Plan`)."""


@dataclass(frozen=True)
class Plan:
    """How much of the registry to run and how often to repeat."""

    name: str
    configs: tuple[str, ...]
    throughput_batch: dict[str, int]
    """The throughput batch of each config on the CPU (a GPU doubles it: see `main`)."""
    repeats: int
    heavy_repeats: int
    heavy_warmup: int
    """Heavy rows (paper-size VQGAN and end to end) reuse modules the stage rows warmed up."""
    original_steps: int
    """Timed steps of the original-style loop on the CPU (scaled to 1000); 0: the whole loop."""
    compile: bool
    lean: bool
    """Paper size: the throughput batch times the U-Net step and the default path only, and the
    end-to-end rows skip eager bf16 (the fused row runs the same U-Net)."""
    scaling_resolutions: tuple[int, ...]
    scaling_batches: tuple[int, ...]
    scaling_steps: tuple[int, ...]
    scaling_config: str
    """Architecture of the resolution and batch series."""
    steps_config: str
    """Config of the steps series."""


PLANS = {
    "smoke": Plan("smoke", ("tiny",), {"tiny": 2}, 2, 1, 0, 3, False, False, (32, 64), (1, 2), (2, 4),
                  "tiny", "tiny"),
    "quick": Plan("quick", ("small", "paper"), {"small": 4, "paper": 2}, 3, 2, 0, 3, False, True,
                  (256, 512, 1024), (1, 2, 4), (5, 10, 20, 50), "paper", "small"),
    "full": Plan("full", ("small", "paper"), {"small": 8, "paper": 2}, 5, 3, 0, 10, True, False,
                 (256, 512, 1024), (1, 2, 4, 8), (5, 10, 20, 50), "paper", "paper"),
}


# ---------------------------------------------------------------------------------------------
# Backends: how to build a pipeline, and whether this machine has what it needs.


class Context:
    """Models, pipelines and FLOP counts, built once per (config, resolution) and reused."""

    def __init__(self, device: torch.device, plan: Plan):
        self.device = device
        self.plan = plan
        self._key: tuple | None = None
        self._cache: dict = {}
        self.rows: list[Row] = []
        """The rows measured so far in this run (`main` appends them): what `cpu-best` picks from."""

    def model_config(self, name: str, resolution: int) -> ModelConfig:
        config = preset(name)
        if resolution and resolution != config.image_size:
            config = dataclasses.replace(config, image_size=resolution)
        return config

    def model(self, name: str, resolution: int) -> Model:
        key = (name, resolution or preset(name).image_size)
        if self._key != key:
            # NOTE: one size at a time: the paper model's copies (fp32, bf16, compiled) are GBs.
            self._cache.clear()
            self._key = key
            self._cache["model"] = random_model(self.model_config(name, resolution))
        return self._cache["model"]

    def cached(self, key: tuple, build: Callable[[], object]):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def pipeline(self, key: tuple, build: Callable[[], object], exclusive: bool = False):
        """`cached`, for pipelines. An `exclusive` one (a CPU engine: compiled models of their own)
        first drops every other exclusive one: the paper model's engines together outgrow 24 GiB,
        and the registry runs each engine's rows one after another."""
        if exclusive:
            key = ("exclusive", *key)
            if key not in self._cache:
                for other in [k for k in self._cache if k[:1] == ("exclusive",)]:
                    del self._cache[other]
                gc.collect()
        return self.cached(key, build)

    def model_dir(self, model: Model) -> Path:
        """A model directory of `model` (saved once per model, in a temporary folder removed with
        the model's cache): what the OpenVINO runner caches its compiled models and the int8 IR in,
        and where the peers read the exported ONNX graphs."""
        def save():
            import tempfile

            from bsldm_fast import modeldir

            scratch = tempfile.TemporaryDirectory(prefix="bsldm-bench-")
            modeldir.save(Path(scratch.name) / "model", model.config, model.vqgan, model.unet)
            return scratch
        return Path(self.cached(("model_dir",), save).name) / "model"

    def config_name(self) -> str:
        """The preset of the model in use (`model`'s last key)."""
        return self._key[0]


@dataclass(frozen=True)
class Backend:
    name: str
    precisions: tuple[str, ...]
    build: Callable[[Context, Model, str], object]
    """(context, model, precision) -> a Pipeline (or the original-style loop)."""
    available: Callable[[torch.device], str | None] = lambda device: None
    """None when usable here, else the reason it is skipped."""
    note: str = ""
    kind: str = "ours"
    """'ours', 'peer' or 'baseline' (the original-style loop): recorded in each row."""
    exclusive: bool = False
    """A CPU engine: one in memory at a time (`Context.pipeline`)."""


class Unavailable(Exception):
    """Raised by a backend's build when the row cannot run here: the row is skipped with the reason."""


def _eager(ctx: Context, model: Model, precision: str) -> Pipeline:
    return Pipeline.create(model.config, model.vqgan, model.unet, ctx.device, precision, "reference", graphs=None)


def _compiled(ctx: Context, model: Model, precision: str) -> Pipeline:
    # Each compiled pipeline starts from empty dynamo caches, as in a fresh process: after the
    # small model's compiles, the paper U-Net compiled in the same process ran 0.81 s a step,
    # against 0.58 s alone.
    torch._dynamo.reset()
    # The U-Net's weights are frozen, as an inference engine may: inductor then prepacks them for
    # oneDNN and folds the residual adds into the convolutions (paper U-Net step, bf16, 2 cores:
    # 0.59 s unfrozen, 0.54-0.58 s frozen). The VQGAN's are not: freezing its strided convolutions
    # in channels-last at batch 8 trips an inductor layout assertion (torch 2.13).
    # Copies: compiling must not touch the modules the eager rows share.
    return Pipeline.create(model.config, copy.deepcopy(model.vqgan), copy.deepcopy(model.unet), ctx.device,
                           precision, "reference", backend="torch-compile", freeze=("unet",), graphs=None)


def _compile_available(device: torch.device) -> str | None:
    try:
        import torch._inductor  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means no inductor
        return f"torch inductor unavailable: {e}"
    return None


FUSED = ("cpp", "cuda", "triton")


def _fused_unavailable(name: str):
    def why(device: torch.device) -> str | None:
        try:
            from bsldm_fast import kernels
        except Exception as e:  # noqa: BLE001 - report whatever broke the import
            return f"bsldm_fast.kernels does not import: {e}"
        return kernels.unavailable(name, device)
    return why


def _fused(name: str):
    def build(ctx: Context, model: Model, precision: str) -> Pipeline:
        return Pipeline.create(model.config, model.vqgan, model.unet, ctx.device, precision, name, graphs=None)
    return build


def _tensorrt_available(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "TensorRT needs a CUDA device"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "tensorrt is not installed"
    return None


def _tensorrt(ctx: Context, model: Model, precision: str) -> Pipeline:
    """The Pipeline on the TensorRT runner, engines built for a temporary model dir, so that every
    stage times the engines through the same calls as the other backends."""
    import tempfile

    from bsldm_fast import modeldir
    from bsldm_fast.engines.tensorrt import build_engines

    path = Path(tempfile.mkdtemp(prefix="bsldm-trt-")) / "model"
    modeldir.save(path, model.config, model.vqgan, model.unet)
    build_engines(path, precision)
    return Pipeline.create(model.config, model.vqgan, model.unet, ctx.device, precision, backend="tensorrt",
                           model_dir=path, graphs=None)


def _original(ctx: Context, model: Model, precision: str) -> OriginalStyle:
    return OriginalStyle(model.vqgan, model.unet, model.config.diffusion, ctx.device)


def _diffusers_available(device: torch.device) -> str | None:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return "diffusers is not installed (the original loop uses its DDPMScheduler)"
    return None


def _cpu_only(why: Callable[[], str | None]) -> Callable[[torch.device], str | None]:
    def available(device: torch.device) -> str | None:
        if device.type != "cpu":
            return "a CPU engine: run with --device cpu"
        return why()
    return available


def _int8_ir(ctx: Context, model: Model, path: Path) -> None:
    """The int8 IRs of the random weights in `path`, for every network `engines.int8` quantises:
    calibrated on one phantom (DDPM, seed 0), for timing only; the quality gate needs trained weights
    and held-out real pairs (benchmarks/int8_gate.py measures it on the bundled model)."""
    import logging

    from bsldm_fast.engines import int8

    # NNCF logs every node it leaves in float at INFO: hundreds of lines in the table. Its import
    # sets its logger's level, so import it first.
    try:
        import nncf  # noqa: F401
    except ImportError:
        pass
    logging.getLogger("nncf").setLevel(logging.WARNING)
    for network in int8.NETWORKS:
        int8.int8_ir(path, model, network, calibration_images=[], phantoms=(0,), runs=(("ddpm", None, 0),))


INT8_NOTE = "int8 IRs calibrated on one phantom for these random weights, ungated: timing only"


def _openvino(ctx: Context, model: Model, precision: str) -> Pipeline:
    """Ours: bsldm_fast's OpenVINO runner on a model directory. int8: the NNCF int8 IRs built for
    these weights and run ungated (`gated=False`: the gate's verdict needs trained weights)."""
    path = ctx.model_dir(model)
    if precision != "int8":
        return Pipeline.create(model.config, model.vqgan, model.unet, ctx.device, precision, backend="openvino",
                               model_dir=path, graphs=None)
    return Pipeline(model.config, _ungated_int8(ctx, model, path), ctx.device)


def _ungated_int8(ctx: Context, model: Model, path: Path):
    """The OpenVINO runner with every network's int8 IR, ungated (the gate needs trained weights)."""
    from bsldm_fast.engines.openvino import OpenVINORunner

    _int8_ir(ctx, model, path)
    return OpenVINORunner(model.config, model.vqgan, model.unet, "int8", path, gated=False)


def _peer(cls):
    def build(ctx: Context, model: Model, precision: str) -> Pipeline:
        graphs = onnx_graphs(ctx.model_dir(model), model.config, model.vqgan, model.unet)
        return Pipeline(model.config, cls(graphs, model.vqgan.quantizer.embedding.weight), ctx.device)
    return build


RUNNER_OF = {"torch-eager": "torch", "torch-compile": "torch-compile", "openvino": "openvino"}
"""run.py's backends of ours that are runner backends (`engines.runners.make_runner`)."""
NETWORK_OF = {"vq-encode": "encoder", "unet-step": "unet", "vq-decode": "decoder"}


def int8_networks(runner) -> set[str]:
    """The networks a runner runs in int8 (`OpenVINORunner.int8_networks`; none for the others)."""
    return set(getattr(runner, "int8_networks", ()))


def best_rows(rows: list[Row], config: str, resolution: int, precision: str) -> dict[str, Row] | str:
    """network -> the fastest checked stage row of ours at batch 1 that a runner backend can rebuild
    (`RUNNER_OF`), among the rows of `precision` (int8: among the int8 and the bf16 rows); or why
    there is none."""
    allowed = ("int8", "bf16") if precision == "int8" else (precision,)
    best = {}
    for stage, network in NETWORK_OF.items():
        timed = [r for r in rows if r.stage == stage and r.kind == "ours" and r.backend in RUNNER_OF
                 and r.config == config and r.resolution == resolution and r.batch == 1 and r.group == "stages"
                 and r.precision in allowed and r.timing is not None]
        if not timed:
            return (f"no checked {'/'.join(allowed)} {stage} row of ours measured earlier in this run "
                    f"(`cpu-best` is built from them: run the stage rows too)")
        best[network] = min(timed, key=lambda r: r.timing.median)
    return best


def _cpu_best(ctx: Context, model: Model, precision: str) -> Pipeline:
    """Each stage on the runner of its fastest checked row of ours in this run, in that row's
    precision: what `backend="auto"` builds (`make_stage_runner`) from `bsldm-fast tune`'s table,
    except that a picked int8 row's OpenVINO runner runs ungated, as the row did (random weights
    have no gate verdict, so the product's runner would run them bf16)."""
    config = model.config
    best = best_rows(ctx.rows, ctx.config_name(), config.image_size, precision)
    if isinstance(best, str):
        raise Unavailable(best)
    path = ctx.model_dir(model)
    torch._dynamo.reset()
    built: dict[tuple[str, str], object] = {}
    for row in best.values():
        key = (RUNNER_OF[row.backend], row.precision)
        if key not in built:
            built[key] = _ungated_int8(ctx, model, path) if key == ("openvino", "int8") else make_runner(
                config, model.vqgan, model.unet, "cpu", row.precision, key[0], model_dir=path,
                freeze=("unet",) if key[0] == "torch-compile" else ())
    staged = StageRunner({n: built[(RUNNER_OF[r.backend], r.precision)] for n, r in best.items()})
    ctx.cached(("cpu-best-choice", precision), lambda: best)
    return Pipeline(config, staged, ctx.device)


def backends(device: torch.device) -> dict[str, Backend]:
    low = ("bf16",) if device.type == "cpu" else ("bf16", "fp16")
    cl = "; bf16 U-Net channels-last" if device.type == "cpu" else ""
    table = [
        Backend("original-style", ("fp32",), _original, _diffusers_available,
                "the BS-LDM loop: DDPMScheduler rebuilt every step, cat, host copy", kind="baseline"),
        Backend("torch-eager", ("fp32",) + low, _eager, note=f"unfused PyTorch step{cl}"),
        Backend("torch-compile", ("fp32",) + low, _compiled, _compile_available,
                note=f"inductor; unfused PyTorch step{cl}"),
    ]
    table += [Backend(f"fused-{n}", ("fp32",) + low, _fused(n), _fused_unavailable(n),
                      note=f"eager U-Net; fused {n} step and VQ quantiser{cl}") for n in FUSED]
    table.append(Backend("tensorrt", ("fp16",), _tensorrt, _tensorrt_available))
    table += [
        Backend("openvino", ("fp32", "bf16", "int8"), _openvino,
                _cpu_only(lambda: backend_unavailable("openvino", torch.device("cpu"))),
                "bsldm_fast's OpenVINO runner (float32 embedding and codebook search)", exclusive=True),
        Backend("onnxruntime", ("fp32",), _peer(OnnxRuntimePeer), _cpu_only(onnxruntime_unavailable),
                "peer: ONNX Runtime CPU on the exported fp32 graphs", kind="peer", exclusive=True),
        Backend("openvino-default", ("bf16",), _peer(OpenVINOPeer), _cpu_only(openvino_peer_unavailable),
                "peer: OpenVINO on the exported fp32 graphs with its bf16 hint as is", kind="peer", exclusive=True),
        Backend("cpu-best", ("bf16", "int8"), _cpu_best, _cpu_only(lambda: None),
                "each stage on the runner of the fastest checked row of ours in this run", exclusive=True),
    ]
    return {b.name: b for b in table}


# ---------------------------------------------------------------------------------------------
# Stages: (scenario, pipeline) -> something to time, its FLOPs and a note.

# Counting on a meta device still builds the model: once per (config, batch) is enough.
unet_flops = functools.lru_cache(maxsize=None)(unet_flops)
vqgan_flops = functools.lru_cache(maxsize=None)(vqgan_flops)


@dataclass
class Prepared:
    fn: Callable[[], object]
    flops: float
    note: str = ""
    image: bool = False
    """The output is an image (end to end): checked by PSNR, else by relative error."""
    output: Callable[[object], object] = lambda result: result
    """The output to check, from what `fn` returns."""
    codes: bool = False
    """The output is a quantised latent (VQ encode): in reduced precision checked by its share of
    changed codes (`checks.check_codes`)."""


def _images(config: ModelConfig, batch: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.rand(batch, 1, config.image_size, config.image_size, generator=g) * 2 - 1).to(device)


def _latents(config: ModelConfig, batch: int, channels: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, channels, config.latent_size, config.latent_size, generator=g).to(device)


def stage_encode(s: Scenario, ctx: Context, p: Pipeline, config: ModelConfig) -> Prepared:
    images = _images(config, s.batch, ctx.device)
    return Prepared(lambda: p.encode(images), vqgan_flops(config, s.batch)[0], codes=True)


def stage_decode(s: Scenario, ctx: Context, p: Pipeline, config: ModelConfig) -> Prepared:
    latents = _latents(config, s.batch, config.vqgan.embedding_dim, ctx.device)
    return Prepared(lambda: p.decode(latents), vqgan_flops(config, s.batch)[1])


def stage_unet(s: Scenario, ctx: Context, p: Pipeline, config: ModelConfig) -> Prepared:
    u = _latents(config, s.batch, config.unet.in_channels, ctx.device)
    t = torch.full((s.batch,), 500, dtype=torch.long, device=ctx.device)

    def step():
        with torch.inference_mode():
            return p.denoiser(u, t)
    # The denoiser as the sampler calls it: input cast and layout, the U-Net, the output slice.
    return Prepared(step, unet_flops(config, s.batch))


class _StubDenoiser:
    """Returns a fixed noise estimate at no cost, so a sampler loop times its own overhead only."""

    def __init__(self, eps: torch.Tensor):
        self.eps = eps

    def __call__(self, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.eps


def stage_sampler(s: Scenario, ctx: Context, p, config: ModelConfig) -> Prepared:
    c = config.diffusion.latent_channels
    elements = s.batch * c * config.latent_size**2
    flops = SAMPLER_STEP_FLOPS.get(s.sampler, 10) * elements
    if isinstance(p, OriginalStyle):
        stub = _StubDenoiser(_latents(config, 1, config.unet.out_channels, ctx.device) * 0.5)
        cxr = _latents(config, 1, c, ctx.device)
        # Times of the loop's steps with a free U-Net: the step, the rebuild, the cat, the host copy.
        return Prepared(lambda: p.loop(cxr, s.steps, stub), flops * config.unet.out_channels // c,
                        "diffusers step + scheduler rebuild + cat + host copy")
    cond = _latents(config, s.batch, c, ctx.device)
    # The pipeline's runner with the U-Net replaced by the stub.
    free = RunnerWith(p.runner, f"{p.runner.name}+stub",
                      denoise=_StubDenoiser(_latents(config, s.batch, c, ctx.device) * 0.5))
    stubbed = Pipeline(config, free, ctx.device, p.step_backend)
    seeds = list(range(s.batch))
    return Prepared(lambda: stubbed.sample_latents(cond, seeds, s.sampler, s.steps), flops,
                    "per step: whole loop with a free denoiser / steps")


def stage_e2e(s: Scenario, ctx: Context, p, config: ModelConfig) -> Prepared:
    images = _images(config, s.batch, ctx.device)
    flops_step = unet_flops(config, s.batch)
    enc, dec = vqgan_flops(config, s.batch)
    flops = enc + dec + flops_step * s.steps
    if isinstance(p, OriginalStyle):
        return Prepared(lambda: p.run(images[:1], max_steps=ctx.plan.original_steps or None), flops, image=True)
    return Prepared(lambda: p.run(images, list(range(s.batch)), s.sampler, s.steps), flops, image=True)


STAGES: dict[str, Callable[..., Prepared]] = {
    "vq-encode": stage_encode,
    "unet-step": stage_unet,
    "sampler-step": stage_sampler,
    "vq-decode": stage_decode,
    "end-to-end": stage_e2e,
}


# ---------------------------------------------------------------------------------------------
# The registry of scenarios.


def scenarios(plan: Plan, device: torch.device, default_backend: str = "torch-eager") -> list[Scenario]:
    """Every row of a run, in order: stage rows per config, then the scaling series (of
    `default_backend`, the Pipeline's default path here, in reduced precision)."""
    cuda = device.type == "cuda"
    fused = [f"fused-{n}" for n in FUSED]
    low = "fp16" if cuda else "bf16"
    rows: list[Scenario] = []
    for cfg in plan.configs:
        paper = preset(cfg).image_size >= 1024
        for batch in (1, plan.throughput_batch[cfg] * (2 if cuda else 1)):
            lean = plan.lean and paper
            heavy = paper and not cuda
            if not (lean and batch > 1):
                for backend in ["torch-eager"] + fused:
                    rows.append(Scenario("vq-encode", backend, "fp32", cfg, batch, heavy=heavy))
                rows.append(Scenario("vq-decode", "torch-eager", "fp32", cfg, batch, heavy=heavy))
            for backend in ("torch-eager", "torch-compile", "tensorrt"):
                for prec in ("fp32", low) if backend != "tensorrt" else ("fp16",):
                    if backend == "torch-compile" and paper and (prec == "fp32" or batch > 1) and not cuda:
                        continue  # NOTE: each compile of the paper U-Net costs minutes on 2 cores
                    rows.append(Scenario("unet-step", backend, prec, cfg, batch))
            if not (lean and batch > 1):
                if batch == 1:
                    rows.append(Scenario("sampler-step", "original-style", "fp32", cfg, 1, 0, "ddpm", 20))
                for sampler in ("ddpm", "dpmpp"):
                    rows += [Scenario("sampler-step", b, "fp32", cfg, batch, 0, sampler, 20)
                             for b in ["torch-eager"] + fused]
            if batch == 1:
                rows.append(Scenario("end-to-end", "original-style", "fp32", cfg, 1, 0, "ddpm", 1000, heavy=True))
            e2e = [("torch-eager", "fp32"), ("torch-eager", low), ("torch-compile", low)]
            e2e += [(f, low) for f in fused] + [("tensorrt", "fp16")]
            for backend, prec in e2e:
                if paper and batch > 1 and not cuda and backend != default_backend:
                    continue  # the paper-size throughput batch on the CPU: the default path only
                if paper and batch > 1 and not cuda and (lean or prec == "fp32"):
                    continue
                if lean and backend == "torch-eager" and prec == low and default_backend != "torch-eager":
                    continue
                rows.append(Scenario("end-to-end", backend, prec, cfg, batch, 0, DEFAULT_SAMPLER,
                                     DEFAULT_STEPS, heavy=heavy))
            if batch == 1 and not cuda:
                rows += cpu_engine_scenarios(cfg, heavy)
    c = plan.scaling_config
    size = preset(c).image_size
    for res in plan.scaling_resolutions:
        # The U-Net step is the same on every step backend: its series is the eager one.
        rows.append(Scenario("unet-step", "torch-eager", low, c, 1, res, group="scaling-resolution"))
        rows.append(Scenario("end-to-end", default_backend, low, c, 1, res, DEFAULT_SAMPLER, DEFAULT_STEPS,
                             group="scaling-resolution", heavy=res >= 512 and not cuda))
    for batch in plan.scaling_batches:
        rows.append(Scenario("unet-step", "torch-eager", low, c, batch, size, group="scaling-batch"))
    sc = plan.steps_config
    for steps in plan.scaling_steps:
        rows.append(Scenario("end-to-end", default_backend, low, sc, 1, preset(sc).image_size, DEFAULT_SAMPLER,
                             steps, group="scaling-steps", heavy=preset(sc).image_size >= 512 and not cuda))
    return rows


CPU_ENGINES = (("openvino", ("fp32", "bf16", "int8")), ("onnxruntime", ("fp32",)), ("openvino-default", ("bf16",)))
"""The CPU engines' rows, ours and peers (their order: each engine's rows run together, one engine
in memory at a time). An int8 stage row is skipped, with why, where the runner runs that network in
bf16 (`OpenVINORunner.int8_networks`)."""


def cpu_engine_scenarios(cfg: str, heavy: bool) -> list[Scenario]:
    """The CPU paths side by side at batch 1, after the torch rows of the config: the bf16 VQ rows
    of eager torch and torch-compile (cpu-best picks among them), each CPU engine's three stages and
    the peers end to end, then `cpu-best` end to end in bf16 and int8."""
    rows = [Scenario(stage, backend, "bf16", cfg, 1, heavy=heavy)
            for stage in ("vq-encode", "vq-decode") for backend in ("torch-eager", "torch-compile")]
    for backend, precisions in CPU_ENGINES:
        for prec in precisions:
            rows += [Scenario(stage, backend, prec, cfg, 1, heavy=heavy and stage != "unet-step")
                     for stage in NETWORK_OF]
            if table_kind(backend) == "peer":
                rows.append(Scenario("end-to-end", backend, prec, cfg, 1, 0, DEFAULT_SAMPLER, DEFAULT_STEPS,
                                     heavy=heavy))
    rows += [Scenario("end-to-end", "cpu-best", prec, cfg, 1, 0, DEFAULT_SAMPLER, DEFAULT_STEPS, heavy=heavy)
             for prec in ("bf16", "int8")]
    return rows


def table_kind(backend: str) -> str:
    return backends(torch.device("cpu"))[backend].kind


# ---------------------------------------------------------------------------------------------
# Running.


def _timing_from(estimates: list[float], peak: float, kind: str) -> Timing:
    import statistics
    return Timing(statistics.median(estimates), min(estimates), max(estimates), len(estimates), peak, kind,
                  estimates)


def prepare(s: Scenario, ctx: Context, table: dict[str, Backend]) -> tuple[Backend, object, ModelConfig, Prepared] | str:
    """(backend, its pipeline, model config, the call to time) for a scenario, or why it is skipped."""
    backend = table.get(s.backend)
    if backend is None:
        return f"backend {s.backend} unknown"
    reason = backend.available(ctx.device)
    if reason:
        return reason
    if s.precision not in backend.precisions:
        return f"{s.backend} has no {s.precision}"
    if s.backend == "torch-compile" and not ctx.plan.compile:
        return "torch.compile is off in this mode (minutes per compile on 2 cores): the full run, --compile, or BSLDM_BENCH_COMPILE=1 for pytest"
    model = ctx.model(s.config, s.resolution)
    config = model.config
    try:
        p = ctx.pipeline((s.backend, s.precision), lambda: backend.build(ctx, model, s.precision), backend.exclusive)
    except Unavailable as why:
        return str(why)
    if s.precision == "int8" and s.stage in NETWORK_OF and NETWORK_OF[s.stage] not in int8_networks(p.runner):
        # An int8 row exists only where int8 runs: elsewhere the int8 runner is its bf16 row.
        return (f"the int8 {s.backend} runner runs the {NETWORK_OF[s.stage]} in bf16 (int8: "
                f"{', '.join(sorted(int8_networks(p.runner))) or 'nothing'}): its bf16 row is this path")
    return backend, p, config, STAGES[s.stage](s, ctx, p, config)


REFERENCE = ("torch-eager", "fp32")
"""The path every row is checked against: the same stage, eager, float32, on the same input."""


@dataclass
class Failed:
    """A scenario that ran but is not a row: its correctness check failed, or it raised."""

    reason: str
    check: Check | None = None


def reference_output(s: Scenario, ctx: Context, table: dict[str, Backend]):
    """The eager float32 output of `s`'s stage on `s`'s input (cached: every backend of a stage
    shares it), or None where the row has no same-noise reference (the original-style loop)."""
    if s.backend == "original-style":
        return None
    ref = dataclasses.replace(s, backend=REFERENCE[0], precision=REFERENCE[1])
    key = ("reference", ref.stage, ref.batch, ref.sampler, ref.steps)

    def compute():
        _, _, _, prepared = prepare(ref, ctx, table)
        return prepared.output(prepared.fn())
    # NOTE: kept in the model's cache, so it goes when the model (config, resolution) changes.
    return ctx.cached(key, compute)


def check_scenario(s: Scenario, ctx: Context, table: dict[str, Backend], prepared: Prepared, result) -> Check:
    """The correctness check of a row's first output, against the eager float32 reference."""
    output = prepared.output(result)
    if s.backend == "original-style":
        return check_finite(output, s.precision, "the original loop draws its own noise (diffusers' scheduler)")
    if (s.backend, s.precision) == REFERENCE:
        # The reference itself: cache this output rather than computing it twice.
        ctx.cached(("reference", s.stage, s.batch, s.sampler, s.steps), lambda: output)
    reference = reference_output(s, ctx, table)
    if prepared.codes:
        return check_codes(output, reference, s.precision)
    return check_output(output, reference, s.precision, image=prepared.image)


def run_scenario(s: Scenario, ctx: Context, table: dict[str, Backend]) -> Row | Failed | str:
    """Check, then measure one scenario; returns its row, a failure (check or error), or the reason
    it was skipped."""
    ready = prepare(s, ctx, table)
    if isinstance(ready, str):
        return ready
    backend, p, config, prepared = ready
    plan = ctx.plan
    warmup, repeats = (plan.heavy_warmup, plan.heavy_repeats) if s.heavy else (1, plan.repeats)
    note = "; ".join(x for x in (backend.note if s.stage in ("unet-step", "end-to-end") or backend.exclusive
                                 else "", prepared.note, _extra_note(s, ctx)) if x)
    # The first call is the check (and, for torch.compile and TensorRT, the build); it stands in
    # for one warm-up call. A row whose output is wrong is never timed.
    start = time.perf_counter()
    first = prepared.fn()
    first_s = time.perf_counter() - start
    warmup = max(warmup - 1, 0)
    check = check_scenario(s, ctx, table, prepared, first)
    del first
    if not check.passed:
        return Failed(f"correctness check failed: {check.summary()}", check)
    compile_s = first_s if s.backend in ("torch-compile", "tensorrt") or backend.exclusive else None
    if isinstance(p, OriginalStyle):
        return dataclasses.replace(_run_original(s, ctx, p, prepared, warmup, repeats, note, check),
                                   kind=backend.kind)
    timing = measure(prepared.fn, warmup, repeats, ctx.device)
    if s.stage == "sampler-step":
        timing = _per_step(timing, s.steps)
    if compile_s is not None:
        compile_s = max(compile_s - timing.median, 0.0)
    return Row(s.stage, s.backend, s.precision, s.batch, config.image_size, s.sampler, s.steps, timing,
               prepared.flops, s.config, s.group, note, compile_s, check.as_dict(), backend.kind)


def _extra_note(s: Scenario, ctx: Context) -> str:
    """What a row of the int8 runner or of cpu-best runs, beyond its backend's note."""
    if s.backend == "cpu-best":
        best = ctx.cached(("cpu-best-choice", s.precision), lambda: {})
        picked = ", ".join(f"{n}={r.backend} {r.precision} ({r.timing.median:.3g} s)" for n, r in best.items())
        return f"{picked}" + (f"; {INT8_NOTE}" if any(r.precision == "int8" for r in best.values()) else "")
    if s.precision == "int8" and s.backend == "openvino":
        return INT8_NOTE
    return ""


def _per_step(t: Timing, steps: int) -> Timing:
    return Timing(t.median / steps, t.minimum / steps, t.maximum / steps, t.repeats, t.peak_rss_mib,
                  t.mem_kind, [x / steps for x in t.times])


def _run_original(s: Scenario, ctx: Context, p: OriginalStyle, prepared: Prepared, warmup: int, repeats: int,
                  note: str, check: Check) -> Row:
    """The original-style loop times its own steps; on the CPU the end-to-end row is scaled."""
    config = ctx.model(s.config, s.resolution).config
    loops = []

    def once():
        loops.append(prepared.fn()[1])
    timing = measure(once, warmup, repeats, ctx.device)
    loops = loops[warmup:]
    if s.stage == "sampler-step":
        steps = [x for step_times in loops for x in step_times]
        t = _timing_from(steps, timing.peak_rss_mib, timing.mem_kind)
        return Row(s.stage, s.backend, s.precision, s.batch, config.image_size, s.sampler, s.steps, t,
                   prepared.flops, s.config, s.group, note, check=check.as_dict())
    timed = len(loops[0].steps)
    total = loops[0].total_steps
    if timed < total:
        # Each timed step is one sample of the per-step cost; the row is encode + decode + 1000 steps.
        estimates = sorted(lt.estimate(x) for lt in loops for x in lt.steps)
        note = f"{note}; timed {timed} of {total} steps x {len(loops)} run(s), scaled to {total}"
    else:
        estimates = [lt.estimate() for lt in loops]
    t = _timing_from(estimates, timing.peak_rss_mib, timing.mem_kind)
    return Row(s.stage, s.backend, s.precision, s.batch, config.image_size, s.sampler, total, t,
               prepared.flops, s.config, s.group, note.strip("; "), check=check.as_dict())


# ---------------------------------------------------------------------------------------------
# Reporting.


def baseline_for(row: Row, rows: list[Row]) -> Row | None:
    """What a row is compared with: the original-style row of its stage and size where there is one,
    else torch-eager fp32 at batch 1 (what the original runs)."""
    same = [r for r in rows if r.stage == row.stage and r.config == row.config
            and r.resolution == row.resolution and r.group == "stages"]
    for r in same:
        if r.backend == "original-style":
            return r
    for r in same:
        if r.backend == "torch-eager" and r.precision == "fp32" and r.batch == 1 and (
                row.stage not in ("sampler-step",) or r.sampler == row.sampler):
            return r
    return None


HEADER = (f"{'stage':<12} {'backend':<16} {'kind':<4} {'prec':<5} {'cfg':<6} {'res':>5} {'batch':>5} {'sampler':<7} "
          f"{'steps':>5} {'median s':>9} {'spread':>6} {'s/img':>8} {'GFLOP/s':>8} {'of peak':>7} "
          f"{'mem MiB':>8} {'vs base':>8}")


def format_row(row: Row, rows: list[Row], peaks: dict[str, float]) -> str:
    base = baseline_for(row, rows)
    ratio = f"{base.per_image / row.per_image:7.1f}x" if base and row.per_image else "       -"
    peak = peaks.get(row.precision)
    share = f"{row.rate / peak:7.1%}" if peak and row.rate else "      -"
    extra = f"  [compile {row.compile_s:.0f} s]" if row.compile_s is not None else ""
    return (f"{row.stage:<12} {row.backend:<16} {row.kind[:4]:<4} {row.precision:<5} {row.config:<6} "
            f"{row.resolution:>5} "
            f"{row.batch:>5} {row.sampler:<7} {row.steps:>5} {row.timing.median:>9.4g} "
            f"{row.timing.spread:>6.1%} {row.per_image:>8.4g} {row.rate / 1e9:>8.1f} {share} "
            f"{row.timing.peak_rss_mib:>8.0f} {ratio}{extra}")


def headline(rows: list[Row], peaks: dict[str, float], config: str = "paper") -> dict:
    """The issue's targets, reported (never asserted): e2e s/image, speed-up over original-style,
    the bf16 U-Net step's share of the bf16 matmul rate."""
    out: dict = {"config": config}
    e2e = [r for r in rows if r.stage == "end-to-end" and r.config == config and r.group == "stages"]
    orig = next((r for r in e2e if r.backend == "original-style"), None)
    fast = [r for r in e2e if r.kind == "ours" and r.sampler == DEFAULT_SAMPLER and r.steps == DEFAULT_STEPS]
    if fast:
        best = min(fast, key=lambda r: r.per_image)
        out.update(best=f"{best.backend} {best.precision} batch {best.batch}",
                   e2e_s_per_image=best.per_image, target_e2e_s=20.0)
        if orig:
            out.update(original_s_per_image=orig.per_image, speedup_vs_original=orig.per_image / best.per_image,
                       target_speedup=100.0)
    low = [r for r in rows if r.stage == "unet-step" and r.config == config and r.group == "stages"
           and r.precision in ("bf16", "fp16") and r.batch == 1 and r.kind == "ours"]
    if low and peaks:
        best = max(low, key=lambda r: r.rate)
        out.update(unet_step=f"{best.backend} {best.precision}", unet_step_s=best.timing.median,
                   unet_fraction_of_peak=best.rate / peaks[best.precision], target_fraction=0.75)
    versus = ours_vs_peers(rows, peaks, config)
    if versus:
        out["ours_vs_peer"] = versus
    return out


def ours_vs_peers(rows: list[Row], peaks: dict[str, float], config: str = "paper") -> dict:
    """Per stage at batch 1: our fastest checked row (any backend and precision) beside the fastest
    peer row, seconds per image and peer / ours (> 1: ours is faster); for the README's block."""
    out = {}
    for stage in ("vq-encode", "unet-step", "vq-decode", "end-to-end"):
        same = [r for r in rows if r.stage == stage and r.config == config and r.group == "stages"
                and r.batch == 1 and r.timing is not None and (stage != "end-to-end" or (
                    r.sampler, r.steps) == (DEFAULT_SAMPLER, DEFAULT_STEPS))]
        ours = [r for r in same if r.kind == "ours"]
        peer = [r for r in same if r.kind == "peer"]
        entry = {}
        for who, candidates in (("ours", ours), ("peer", peer)):
            if candidates:
                best = min(candidates, key=lambda r: r.per_image)
                entry.update({who: f"{best.backend} {best.precision}", f"{who}_s": best.per_image,
                              f"{who}_gflops": best.rate / 1e9 if best.rate else None,
                              f"{who}_of_peak": best.rate / peaks[best.precision]
                              if best.rate and peaks.get(best.precision) else None})
        if ours and peer:
            entry["peer_over_ours"] = entry["peer_s"] / entry["ours_s"]
        if entry:
            out[stage] = entry
    return out


def plot_scaling(rows: list[Row], path: Path, title: str) -> Path | None:
    """Time vs resolution, batch and steps, one panel each, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("scaling-resolution", "image size (px)", lambda r: r.resolution, "resolution"),
        ("scaling-batch", "batch", lambda r: r.batch, "batch"),
        ("scaling-steps", "sampler steps", lambda r: r.steps, "steps"),
    ]
    if not any(r.group.startswith("scaling") for r in rows):
        return None
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for ax, (group, xlabel, x_of, short) in zip(axes, panels):
        series = [r for r in rows if r.group == group]
        for stage in ("unet-step", "end-to-end"):
            pts = sorted((x_of(r), r.timing.median, r.per_image) for r in series if r.stage == stage)
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ax.plot(xs, [p[1] for p in pts], "o-", label=f"{stage} (per call)")
            if group == "scaling-batch":
                ax.plot(xs, [p[2] for p in pts], "s--", label=f"{stage} (per image)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("seconds")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"time vs {short}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer repeats and rows, no torch.compile (about 30 min on 2 cores, most of it the "
                      "paper-size CPU engines; narrow with --configs/--backends/--only)")
    mode.add_argument("--smoke", action="store_true", help="the tiny config only, seconds (for tests)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="include torch.compile rows in --quick/--smoke")
    parser.add_argument("--only", default="", help="comma-separated stages to run (default: all): "
                        + ",".join(STAGE_ORDER))
    parser.add_argument("--configs", default="", help="comma-separated model configs to run (default: the "
                        "plan's, e.g. small,paper; the scaling series too)")
    parser.add_argument("--backends", default="", help="comma-separated backends to run (default: all), e.g. "
                        "openvino,onnxruntime,openvino-default,cpu-best,torch-eager (cpu-best needs the stage "
                        "rows of ours it picks from)")
    parser.add_argument("--no-scaling", action="store_true", help="skip the scaling series and plot")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--tag", default="", help="appended to the file names, e.g. 'dev'")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    plan = PLANS["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.compile:
        plan = dataclasses.replace(plan, compile=True)
    device = torch.device(args.device)
    if device.type == "cuda":
        # On a GPU the original-style loop runs whole.
        plan = dataclasses.replace(plan, original_steps=0)
    ctx = Context(device, plan)
    table = backends(device)
    info = machine(device)
    started = time.perf_counter()
    print(f"bsldm_fast benchmark ({plan.name}) on {info['device']} / {info['processor']}, "
          f"{info['threads']} threads, torch {info['torch']}", flush=True)

    low = "fp16" if device.type == "cuda" else "bf16"
    precisions = ("fp32", "bf16", "fp16") if device.type == "cuda" else ("fp32", "bf16")

    int8_gemm: dict[str, dict] = {}

    def peaks_now(when: str) -> dict[str, float]:
        peaks = {p: matmul_peak(PRECISIONS[p], device=device) for p in precisions}
        if device.type == "cpu":
            # int8 in 2*M*N*K ops/s (`timing.INT8_UNIT`): the best of torch._int_mm and OpenVINO's.
            int8_gemm[when] = int8_gemm_peak()
            peaks["int8"] = int8_gemm[when]["ops_per_s"]
        return peaks

    def show(peaks: dict[str, float], when: str) -> str:
        how = int8_gemm.get(when, {}).get("how")
        return ", ".join(f"{k} {v / 1e9:.0f} {'GOP/s (' + str(how) + ')' if k == 'int8' else 'GFLOP/s'}"
                         for k, v in peaks.items())
    # NOTE: measured at the start and again at the end; the best of the two is the ceiling, and a
    # large difference between them says the machine was busy during the run.
    peaks_start = peaks_now("start")
    print(f"measured matmul peak: {show(peaks_start, 'start')}", flush=True)
    peaks = dict(peaks_start)

    # The Pipeline's default path here: the first fused step backend present, else unfused.
    default_backend = next((n for n, b in table.items() if n.startswith("fused-") and b.available(device) is None),
                           "torch-eager")
    todo = scenarios(plan, device, default_backend)
    filters = (("only", "stage", STAGE_ORDER), ("configs", "config", None), ("backends", "backend", table))
    for flag, field, known in filters:
        if getattr(args, flag):
            keep = set(getattr(args, flag).split(","))
            unknown = keep - set(known if known is not None else {s.config for s in todo})
            if unknown:
                parser.error(f"--{flag}: unknown {sorted(unknown)}")
            todo = [s for s in todo if getattr(s, field) in keep]
    if args.no_scaling:
        todo = [s for s in todo if s.group == "stages"]
    rows: list[Row] = []
    skipped: list[dict] = []
    failed: list[dict] = []
    print(HEADER, flush=True)
    measured: dict[Scenario, Row] = {}
    for i, s in enumerate(todo, 1):
        # A scaling point equal to a stage row is that row, not a second measurement.
        key = dataclasses.replace(s, group="stages", heavy=False,
                                  resolution=s.resolution or preset(s.config).image_size)
        if key in measured:
            result = measured[key]
            if isinstance(result, Row):
                result = dataclasses.replace(result, group=s.group)
        else:
            try:
                result = run_scenario(s, ctx, table)
            except Exception as e:  # noqa: BLE001 - one broken row must not lose the run's others
                traceback.print_exc()
                result = Failed(f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            if isinstance(result, (Row, Failed)):
                measured[key] = result
        if isinstance(result, Failed):
            # Recorded with its measured error; never a row, so never in a ratio or the README.
            failed.append({**dataclasses.asdict(s), "reason": result.reason,
                           "check": result.check.as_dict() if result.check else None})
            print(f"  FAILED {s.stage} {s.backend} {s.precision} {s.config} batch {s.batch}: {result.reason}",
                  flush=True)
            continue
        if isinstance(result, str):
            skipped.append({**dataclasses.asdict(s), "reason": result})
            print(f"  skip {s.stage} {s.backend} {s.precision} {s.config} batch {s.batch}: {result}", flush=True)
            continue
        rows.append(result)
        ctx.rows.append(result)
        print(f"{format_row(result, rows, peaks)}   ({i}/{len(todo)}, {time.perf_counter() - started:.0f} s)",
              flush=True)

    peaks_end = peaks_now("end")
    peaks = {k: max(peaks_start[k], peaks_end[k]) for k in peaks_start}
    print(f"matmul peak at the end: {show(peaks_end, 'end')}"
          + " (the table's 'of peak' used the start's; the JSON uses the best of both)", flush=True)
    wall = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = usage.ru_utime + usage.ru_stime
    heads = {c: headline(rows, peaks, c) for c in plan.configs if not args.configs or c in args.configs.split(",")}
    name = machine_slug(info)
    # Only a whole full run owns the plain name (summary.py prefers it); --only makes a partial one.
    mode = plan.name + ("-partial" if args.only or args.no_scaling or args.configs or args.backends else "")
    suffix = ("" if mode == "full" else f"-{mode}") + (f"-{args.tag}" if args.tag else "")
    path = write_results(rows, peaks, name, args.out, device=device, suffix=suffix,
                         extra={"mode": mode, "tag": args.tag, "only": args.only, "configs": args.configs,
                                "backends": args.backends, "int8_gemm": int8_gemm, "wall_s": wall, "cpu_s": cpu_s, "headline": heads, "skipped": skipped,
                                "failed": failed, "tolerances": tolerances(),
                                "matmul_peak_start": peaks_start, "matmul_peak_end": peaks_end})
    title = f"{default_backend} {low}: resolution and batch at {plan.scaling_config} architecture, steps at {plan.steps_config}, {info['device']} / {info['processor']}, {info['date']}"
    png = plot_scaling(rows, path.with_suffix(".png"), title)
    print(f"\nheadline: {json.dumps(heads, indent=1)}")
    if failed:
        print(f"{len(failed)} row(s) failed their correctness check or raised, and are not in the table: "
              + "; ".join(f"{f['stage']} {f['backend']} {f['precision']} {f['config']} batch {f['batch']}"
                          for f in failed))
    print(f"wrote {path}" + (f" and {png.name}" if png else "") + f" in {wall:.0f} s "
          f"({cpu_s:.0f} CPU-seconds on {info['threads']} threads; far more wall than CPU/threads means a busy machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
