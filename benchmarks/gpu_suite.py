"""The GPU suite's end-to-end timings: the CUDA-graph pipeline against the original-style loop.

Run by `benchmarks/gpu_suite.sh` (which first builds the extension and runs the GPU tests) on an
H100/H200 with CUDA, PyTorch and Triton and no network; `--quick` is a dry run of the plumbing
(tiny model, few repeats) that also works on the CPU, where the CUDA-only parts are skipped.

Every part runs in its own try/except and is recorded in the JSON as ok, failed (with the
traceback's end) or skipped (with why, e.g. out of time); a failure never stops the suite. Parts run
in order of importance within `--budget-s` seconds. Writes `results/gpu-<device>-<date>.json` (and a
copy into $OUT when set) and prints a summary table last.

Targets (reported, not asserted; issue 9): paper model, 1024², batch 1, default few-step sampler,
torch-compile path: end to end <= 25 ms on an H100; images/s at batch 16; peak GPU memory <= 4 GiB
at batch 1; every stage as a share of the roofline (its FLOPs over the measured bf16 matmul rate).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from checks import Check, check_finite, check_output, psnr, tolerances  # noqa: E402
from timing import (Row, Timing, copy_bandwidth, machine, machine_slug, matmul_peak, measure,  # noqa: E402
                    sync, unet_flops, vqgan_flops, write_results)

from bsldm_fast import _ext, kernels  # noqa: E402
from bsldm_fast.diffusion.noise import seed_tensor  # noqa: E402
from bsldm_fast.engines.runners import Runner, make_runner  # noqa: E402
from bsldm_fast.modeldir import random_model  # noqa: E402
from bsldm_fast.pipeline import DEFAULT_SAMPLER, DEFAULT_STEPS, PRECISIONS, CudaGraphs, Pipeline  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SAMPLES = ROOT / "assets" / "szch_samples" / "cxr"
TARGET_E2E_S = 0.025
TARGET_PEAK_MIB = 4096
TARGET_PSNR_DB = 45.0
SAMPLER = DEFAULT_SAMPLER
"""The default few-step sampler (`pipeline.DEFAULT_SAMPLER`, `pipeline.DEFAULT_STEPS` steps)."""


class Skip(Exception):
    """A part that cannot run here; the message says why."""


class CheckFailed(Exception):
    """A path whose output failed its correctness check: recorded as failed, never timed."""

    def __init__(self, what: str, check: Check):
        super().__init__(f"{what}: correctness check failed: {check.summary()}")
        self.check = check


class Suite:
    """Runs parts in order within a time budget and records each one's outcome."""

    def __init__(self, budget_s: float, device: torch.device):
        self.deadline = time.monotonic() + budget_s
        self.device = device
        self.parts: dict[str, dict] = {}
        self.after: Callable[[], None] | None = None
        """Called after every part (saves the results so far)."""

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def part(self, name: str, fn: Callable[[], object], need_s: float = 0.0):
        """Run `fn` unless fewer than `need_s` seconds are left; record ok/failed/skipped."""
        try:
            return self._part(name, fn, need_s)
        finally:
            if self.after is not None:
                try:
                    self.after()
                except Exception:  # noqa: BLE001 - saving must not stop the suite either
                    traceback.print_exc()

    def _part(self, name: str, fn: Callable[[], object], need_s: float):
        if self.left() < need_s:
            self._record(name, "skipped", 0.0, f"out of time: needs ~{need_s:.0f} s, {self.left():.0f} s left")
            return None
        start = time.monotonic()
        print(f"-- {name} ({self.left():.0f} s left)", flush=True)
        try:
            result = fn()
            self._record(name, "ok", time.monotonic() - start)
            return result
        except Skip as reason:
            self._record(name, "skipped", time.monotonic() - start, str(reason))
        except Exception as error:  # noqa: BLE001 - every failure is recorded, none stops the suite
            text = traceback.format_exc()
            self._record(name, "failed", time.monotonic() - start, f"{type(error).__name__}: {error}",
                         text[-4000:])
        finally:
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                torch.cuda.empty_cache()
        return None

    def _record(self, name, status, seconds, reason="", trace=""):
        entry = {"status": status, "seconds": round(seconds, 2)}
        if reason:
            entry["reason"] = reason
        if trace:
            entry["traceback"] = trace
        self.parts[name] = entry
        print(f"   {name}: {status}{' - ' + reason if reason else ''} ({seconds:.1f} s)", flush=True)
        if trace:
            print(trace, flush=True)


def sample_images(size: int, batch: int) -> torch.Tensor:
    """The bundled sample radiographs as the Suppressor reads and resizes them (`preprocess`),
    cycled to `batch`, in [-1, 1]."""
    from bsldm_fast import preprocess

    images = [preprocess.read_at_size(p, size) for p in sorted(SAMPLES.glob("*.png"))]
    if not images:
        raise FileNotFoundError(f"no sample images in {SAMPLES}")
    return preprocess.to_model_range(torch.cat([images[i % len(images)] for i in range(batch)]))


def _reset_memory(device) -> int:
    gc.collect()
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _peak_mib(device, base: int) -> float | None:
    if device.type != "cuda":
        return None
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


class Context:
    def __init__(self, args, device: torch.device):
        self.args = args
        self.device = device
        self.repeats = 3 if args.quick else 10
        self.model = None
        self.config = None
        self.model_source = ""
        self.flops: dict[str, float] = {}
        self.peaks: dict[str, float] = {}
        self.bandwidth = 0.0
        self.reference: torch.Tensor | None = None
        self.images1: torch.Tensor | None = None
        self.seed = 11
        self.rows: list[Row] = []
        self.e2e: dict[str, dict] = {}
        """Summary of each end-to-end configuration (timing, memory, PSNR)."""
        self.baseline: dict = {}
        self.compiled_runner: Runner | None = None
        self.reference_runner: Runner | None = None
        """Eager float32: what every stage row is checked against."""
        self.failed: list[dict] = []
        """Rows that failed their correctness check: recorded with the error, never timed."""
        self.psnr_demo: dict = {}
        self.ranks: list[dict] | None = None
        """`bsldm-fast suppress` on one GPU and under torchrun on all of them (benchmarks/ranks.py)."""
        self.results_path: Path | None = None
        self.left: Callable[[], float] = lambda: math.inf
        """Seconds left in the suite's budget (the suite's clock, set by main)."""


# ---------------------------------------------------------------------------------------------
# Parts


def part_environment(ctx: Context) -> dict:
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "extension": _ext.C is not None,
            "extension_error": None if _ext.C is not None else str(_ext.load_error),
            "extension_cuda": bool(_ext.C is not None and _ext.has_cuda_ops())}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError as error:
        info["triton"] = f"missing: {error}"
    try:
        import tensorrt

        info["tensorrt"] = tensorrt.__version__
    except ImportError:
        info["tensorrt"] = None
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        info["diffusers"] = None
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        info.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}",
                    multiprocessors=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1))
    info["step_backends"] = {b: kernels.unavailable(b, ctx.device) or "ok"
                             for b in ("triton", "cuda", "cpp", "reference")}
    print(json.dumps(info, indent=1), flush=True)
    return info


def part_peaks(ctx: Context) -> None:
    sizes = (1024, 2048) if ctx.args.quick else (4096, 8192)
    for name in ("bf16", "fp16", "fp32"):
        if ctx.device.type == "cpu" and name == "fp16":
            continue
        ctx.peaks[name] = matmul_peak(PRECISIONS[name], sizes, repeats=3 if ctx.args.quick else 5,
                                      device=ctx.device)
    # 64 MiB or 1 GiB of float32, far beyond the caches.
    ctx.bandwidth = copy_bandwidth(ctx.device, 10, (64 if ctx.args.quick else 1024) << 18)
    print("matmul peaks: " + ", ".join(f"{k} {v / 1e12:.1f} TFLOP/s" for k, v in ctx.peaks.items())
          + f"; copy {ctx.bandwidth / 1e12:.2f} TB/s", flush=True)


def part_model(ctx: Context) -> None:
    """A random model of the timed config (paper size: what the targets are stated for)."""
    name = ctx.args.config
    ctx.model = random_model(name, seed=5)
    ctx.config = ctx.model.config
    ctx.model_source = f"random:{name}"
    config = ctx.config
    enc, dec = vqgan_flops(config, 1)
    ctx.flops = {"vq-encode": enc, "vq-decode": dec, "unet-step": unet_flops(config, 1)}
    ctx.images1 = sample_images(config.image_size, 1).to(ctx.device)
    print(f"model {ctx.model_source}: {config.image_size}², FLOPs " +
          ", ".join(f"{k} {v / 1e9:.1f} G" for k, v in ctx.flops.items()), flush=True)


def part_psnr_demo(ctx: Context) -> dict:
    """PSNR of the graph pipeline (fp16, bf16) against the eager fp32 reference with the trained demo
    model on the three sample radiographs (resized to its size): trained weights keep latents in
    distribution, where a random model's decoder amplifies any difference."""
    from bsldm_fast.modeldir import DEMO_DIR, load

    if not (DEMO_DIR / "config.json").is_file():
        raise Skip(f"the demo model is not bundled ({DEMO_DIR})")
    model, device = load(DEMO_DIR), ctx.device
    images = sample_images(model.config.image_size, 3).to(device)
    seeds = [ctx.seed, ctx.seed + 1, ctx.seed + 2]
    reference = _fp32_reference(model, images, seeds, device)
    out = {}
    for precision in ("fp16", "bf16") if device.type == "cuda" else ("bf16",):
        pipe = Pipeline.create(model.config, model.vqgan, model.unet, device, precision)
        result = torch.cat([pipe.run(images[i : i + 1], seeds[i : i + 1], SAMPLER) for i in range(3)])
        out[precision] = [psnr(reference[i], result[i]) for i in range(3)]
    print(f"demo model PSNR vs fp32 (dB): {json.dumps(out)}", flush=True)
    ctx.psnr_demo = out
    return out


def part_ranks(ctx: Context) -> list[dict]:
    """`bsldm-fast suppress` on one GPU and under torchrun on every GPU of the machine (issue 18):
    images/s of each, after checking that they write the same images (benchmarks/ranks.py)."""
    gpus = torch.cuda.device_count() if ctx.device.type == "cuda" else 0
    if gpus < 2:
        raise Skip(f"{gpus} GPU(s): the multi-GPU path needs more than one (2 CPU ranks over gloo "
                   "are tested in tests/distributed)")
    out_dir = Path(tempfile.mkdtemp(prefix="bsldm-ranks-"))
    command = [sys.executable, str(ROOT / "benchmarks" / "ranks.py"), "--device", "cuda",
               "--procs", f"1,{gpus}", "--images", str(32 * gpus), "--repeats", "1",
               "--out-dir", str(out_dir)]
    done = subprocess.run(command, capture_output=True, text=True,
                          timeout=max(30.0, ctx.left() - 10))
    print(done.stdout[-3000:], flush=True)
    results = sorted(out_dir.glob("ranks-*.json"))
    if not results:
        raise RuntimeError(f"ranks.py wrote no result (exit {done.returncode}): {done.stderr[-1500:]}")
    if os.environ.get("OUT"):
        shutil.copy(results[0], Path(os.environ["OUT"]) / results[0].name)
    ctx.ranks = json.loads(results[0].read_text())["rows"]
    if done.returncode != 0:
        raise RuntimeError(f"a GPU count failed its run or its check: {json.dumps(ctx.ranks)[:1500]}")
    return ctx.ranks


@contextlib.contextmanager
def _no_tf32():
    """float32 as float32: the reference must not run its matmuls in TF32."""
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def _fp32_reference(model, images: torch.Tensor, seeds: list[int], device) -> torch.Tensor:
    """Eager float32 outputs, unfused samplers, TF32 off, one image at a time."""
    with _no_tf32():
        ref = Pipeline.create(model.config, model.vqgan, model.unet, device, "fp32", "reference")
        return torch.cat([ref.run(images[i : i + 1], seeds[i : i + 1], SAMPLER).cpu()
                          for i in range(images.shape[0])])


def part_reference(ctx: Context) -> None:
    """The eager float32 reference output of sample 0: the PSNR anchor of the timed rows."""
    ctx.reference = _fp32_reference(ctx.model, ctx.images1, [ctx.seed], ctx.device)


def _stage_rows(ctx: Context, runner, backend: str, precision: str, pipe: Pipeline) -> None:
    """encode / U-Net step / sampler step / decode of a runner, each timed on its own (batch 1)."""
    config, device, steps = ctx.config, ctx.device, DEFAULT_STEPS[SAMPLER]
    program = pipe.program(1, SAMPLER)
    images = ctx.images1
    u = program.sampling.u.clone().normal_()
    t = program.sampling.timesteps[0]
    # A view of U with the loop's own strides: new strides would make torch.compile recompile.
    latent = u[:, : config.diffusion.latent_channels]
    eps = latent.clone().normal_()
    x = latent.clone()
    x0 = torch.zeros_like(x)
    plan = program.plan.entries[1]
    seeds = seed_tensor([ctx.seed], device)

    def one_step(x, x0, backend):
        # The sampler's own kernel: the default sampler's plan is not always DPM-Solver++'s.
        if isinstance(plan, kernels.DPMStep):
            kernels.dpmpp_2m_step(x, eps, x0, plan, x, x0, backend)
        elif isinstance(plan, kernels.DDIMStep):
            kernels.ddim_step(x, eps, seeds, 1, plan, x, backend=backend)
        else:
            kernels.ddpm_step(x, eps, seeds, 1, plan, x, backend=backend)

    def step():
        one_step(x, x0, pipe.step_backend)

    common = dict(batch=1, resolution=config.image_size, config=config.name, group="gpu-suite")
    if ctx.reference_runner is None:
        ctx.reference_runner = make_runner(config, ctx.model.vqgan, ctx.model.unet, device, "fp32")
    ref = ctx.reference_runner

    def sampler_output(backend: str) -> torch.Tensor:
        # One step from the same state, on copies: the timed tensors keep their strides.
        xc, x0c = x.clone(), x0.clone()
        one_step(xc, x0c, backend)
        return xc

    with torch.inference_mode():
        for stage, fn, flops, check_pair in (
                ("vq-encode", lambda: runner.encode(images), ctx.flops["vq-encode"],
                 lambda: (runner.encode(images), ref.encode(images), precision)),
                ("unet-step", lambda: runner.denoise(u, t), ctx.flops["unet-step"],
                 lambda: (runner.denoise(u, t), ref.denoise(u, t), precision)),
                ("sampler-step", step, 0.0,
                 lambda: (sampler_output(pipe.step_backend), sampler_output("reference"), "fp32")),
                ("vq-decode", lambda: runner.decode(latent), ctx.flops["vq-decode"],
                 lambda: (runner.decode(latent), ref.decode(latent), precision))):
            # Correctness before timing: the stage's output against the eager float32 one.
            with _no_tf32():
                out, expected, prec = check_pair()
            check = check_output(out, expected, prec)
            if not check.passed:
                ctx.failed.append({"stage": stage, "backend": backend, "precision": precision, "batch": 1,
                                   "config": config.name, "group": "gpu-suite",
                                   "reason": f"correctness check failed: {check.summary()}",
                                   "check": check.as_dict()})
                print(f"   {stage} {backend} {precision}: FAILED its correctness check: {check.summary()}",
                      flush=True)
                continue
            timing = measure(fn, warmup=2, repeats=ctx.repeats * (5 if stage == "sampler-step" else 1),
                             device=device)
            note = "eager call (outside the graph)"
            if stage == "sampler-step":
                # Memory-bound: 3 tensors read, 2 written, float32.
                moved = 5 * x.numel() * 4
                note += f"; {moved / timing.median / 1e9:.1f} GB/s of {ctx.bandwidth / 1e9:.0f} measured"
            ctx.rows.append(Row(stage, backend, precision, sampler=SAMPLER if stage == "sampler-step" else "-",
                                steps=steps if stage == "sampler-step" else 0, timing=timing, flops=flops,
                                note=note, check=check.as_dict(), **common))


def _e2e(ctx: Context, name: str, runner_factory: Callable[[], object], precision: str, batch: int,
         stages: bool = False, keep_runner: bool = False) -> dict:
    """Build (compile, capture) and time one configuration of the graph pipeline end to end."""
    device, config = ctx.device, ctx.config
    images = ctx.images1 if batch == 1 else sample_images(config.image_size, batch).to(device)
    seeds = [ctx.seed + i for i in range(batch)]
    base = _reset_memory(device)
    start = time.perf_counter()
    runner = runner_factory()
    pipe = Pipeline(config, runner, device, "auto", graphs=CudaGraphs(device) if device.type == "cuda" else None)
    out = pipe.run(images, seeds, SAMPLER)
    sync(device)
    setup_s = time.perf_counter() - start
    setup_peak = _peak_mib(device, base)
    # Correctness before timing: sample 0 (same image, same seed) against the eager float32 image.
    if ctx.reference is None:
        check = Check(False, "psnr_db", None, None, precision, 0, "no float32 reference (its part failed)")
    else:
        check = check_output(out[:1], ctx.reference[:1], precision, image=True)
    if not check.passed:
        ctx.failed.append({"stage": "end-to-end", "backend": runner.name, "precision": precision, "batch": batch,
                           "config": config.name, "group": "gpu-suite", "reason": check.summary(),
                           "check": check.as_dict()})
        ctx.e2e[name] = {"backend": runner.name, "precision": precision, "batch": batch, "failed": check.as_dict()}
        raise CheckFailed(name, check)
    timing = measure(lambda: pipe.run(images, seeds, SAMPLER), warmup=1, repeats=ctx.repeats, device=device)
    replay_peak = None if device.type != "cuda" else timing.peak_rss_mib - base / 2**20
    steps = DEFAULT_STEPS[SAMPLER]
    flops = batch * (ctx.flops["vq-encode"] + ctx.flops["vq-decode"] + steps * ctx.flops["unet-step"])
    summary = {
        "backend": runner.name, "precision": precision, "batch": batch, "sampler": SAMPLER,
        "steps": steps, "step_backend": pipe.step_backend, "cuda_graph": pipe.graphs is not None,
        "setup_s": round(setup_s, 2), "median_s": timing.median, "min_s": timing.minimum,
        "images_per_s": batch / timing.median,
        "peak_mib": max(p for p in (setup_peak, replay_peak) if p is not None) if setup_peak is not None else None,
        "reserved_mib": torch.cuda.memory_reserved(device) / 2**20 if device.type == "cuda" else None,
        "flops": flops, "roofline_share_bf16": flops / timing.median / ctx.peaks["bf16"] if ctx.peaks.get("bf16") else None,
    }
    summary["psnr_db_vs_fp32_reference"] = check.value
    ctx.rows.append(Row("end-to-end", runner.name, precision, batch, config.image_size, SAMPLER, steps,
                        timing, flops, config.name, "gpu-suite",
                        note=("CUDA graph replay" if pipe.graphs is not None else "uncaptured (no CUDA)")
                        + f"; setup (compile + capture) {setup_s:.1f} s",
                        compile_s=setup_s, check=check.as_dict()))
    ctx.e2e[name] = summary
    print(json.dumps({name: summary}, default=str), flush=True)
    if stages:
        _stage_rows(ctx, runner, runner.name, precision, pipe)
    if keep_runner:
        ctx.compiled_runner = runner
    return summary


def _torch_runner(ctx: Context, precision: str, compile: bool = False):
    return lambda: make_runner(ctx.config, ctx.model.vqgan, ctx.model.unet, ctx.device, precision,
                               "torch-compile" if compile else "torch", compile_mode=ctx.args.compile_mode)


def _needs_cuda(ctx: Context, what: str) -> None:
    if ctx.device.type != "cuda":
        raise Skip(f"{what} needs CUDA (dry run on {ctx.device})")


def part_baseline_sampled(ctx: Context) -> None:
    """The original-style eager fp32 DDPM-1000 loop: a few timed steps, scaled to 1000."""
    config, device = ctx.config, ctx.device
    images = ctx.images1
    try:
        import diffusers  # noqa: F401

        from original_style import OriginalStyle

        loop = OriginalStyle(copy.deepcopy(ctx.model.vqgan), copy.deepcopy(ctx.model.unet),
                             config.diffusion, device)
        kind = "original-style (BS-LDM ldm_eval.py loop: diffusers DDPMScheduler rebuilt per step)"
        first, times = loop.run(images, max_steps=2)  # warm-up (cuDNN, allocator), and its check
        check = check_finite(first, "fp32", "the original loop draws its own noise (diffusers' scheduler)")
        if not check.passed:
            raise CheckFailed("original-style", check)
        _, times = loop.run(images, max_steps=10)
        estimate = times.estimate(float(np.median(times.steps)))
        ctx.baseline = {"kind": kind, "estimate_s": estimate, "step_s": float(np.median(times.steps)),
                        "encode_s": times.encode, "decode_s": times.decode, "timed_steps": len(times.steps),
                        "total_steps": times.total_steps, "_loop": loop, "check": check.as_dict()}
    except ImportError:
        # diffusers is not on the GPU machine: the same eager fp32 DDPM-1000 loop on our unfused
        # PyTorch samplers (what the original computes, without its scheduler rebuilds and host copies).
        pipe = Pipeline.create(config, ctx.model.vqgan, ctx.model.unet, device, "fp32", "reference")
        kind = ("eager fp32 DDPM-1000 on bsldm_fast's unfused reference sampler (diffusers is missing, "
                "so not the original's scheduler object)")
        with torch.inference_mode():
            cond = pipe.encode(images)
            enc = measure(lambda: pipe.encode(images), warmup=1, repeats=3, device=device)
            u = torch.cat([torch.randn_like(cond), cond], 1)
            t = torch.full((1,), 500, dtype=torch.int64, device=device)
            check = check_finite(pipe.denoiser(u, t), "fp32", "the eager float32 reference itself")
            if not check.passed:
                raise CheckFailed("baseline", check)
            step = measure(lambda: pipe.denoiser(u, t), warmup=2, repeats=10, device=device)
            dec = measure(lambda: pipe.decode(cond), warmup=1, repeats=3, device=device)
        total = config.diffusion.num_train_timesteps
        ctx.baseline = {"kind": kind, "estimate_s": enc.median + dec.median + total * step.median,
                        "step_s": step.median, "encode_s": enc.median, "decode_s": dec.median,
                        "timed_steps": 10, "total_steps": total, "_pipe": pipe, "check": check.as_dict()}
    print(f"baseline estimate {ctx.baseline['estimate_s']:.1f} s ({ctx.baseline['step_s'] * 1e3:.1f} ms/step)",
          flush=True)


def part_baseline_whole(ctx: Context) -> None:
    """The whole baseline loop, timed once (when it fits the budget)."""
    if not ctx.baseline:
        raise Skip("the sampled baseline failed")
    estimate = ctx.baseline["estimate_s"]
    if estimate > ctx.left() - ctx.args.reserve_s:
        raise Skip(f"whole loop ~{estimate:.0f} s does not fit the {ctx.left():.0f} s left")
    device = ctx.device
    start = time.perf_counter()
    if "_loop" in ctx.baseline:
        ctx.baseline["_loop"].run(ctx.images1)
    else:
        ctx.baseline["_pipe"].run(ctx.images1, [ctx.seed], "ddpm", ctx.config.diffusion.num_train_timesteps)
    sync(device)
    ctx.baseline["whole_s"] = time.perf_counter() - start


def baseline_row(ctx: Context) -> None:
    b = ctx.baseline
    if not b:
        return
    seconds = b.get("whole_s", b["estimate_s"])
    note = b["kind"] + ("; timed whole" if "whole_s" in b else
                        f"; {b['timed_steps']} steps timed and scaled to {b['total_steps']}")
    steps = b["total_steps"]
    flops = ctx.flops["vq-encode"] + ctx.flops["vq-decode"] + steps * ctx.flops["unet-step"]
    ctx.rows.append(Row("end-to-end", "original-style", "fp32", 1, ctx.config.image_size, "ddpm", steps,
                        Timing(seconds, seconds, seconds, 1, 0.0, "none", [seconds]), flops,
                        ctx.config.name, "gpu-suite", note, check=b["check"]))


def targets(ctx: Context) -> dict:
    """The issue's targets, reported beside what was measured (never asserted)."""
    out: dict = {}
    passed = {n: e for n, e in ctx.e2e.items() if "failed" not in e}  # a failed path has no timing
    compiled = passed.get("torch-compile-bf16-b1")
    best_b1 = compiled or passed.get("torch-bf16-b1")
    if best_b1:
        out["e2e_batch1"] = {"config": "torch-compile-bf16-b1" if compiled else "torch-bf16-b1 (compile missing)",
                             "seconds": best_b1["median_s"], "target_s": TARGET_E2E_S,
                             "met": best_b1["median_s"] <= TARGET_E2E_S}
        if best_b1.get("peak_mib") is not None:
            out["peak_memory_batch1"] = {"mib": best_b1["peak_mib"], "target_mib": TARGET_PEAK_MIB,
                                         "met": best_b1["peak_mib"] <= TARGET_PEAK_MIB}
    for precision, values in ctx.psnr_demo.items():
        out.setdefault("psnr_db", {})[f"demo-model-{precision}"] = {
            "db": min(values), "per_image": values, "target_db": TARGET_PSNR_DB, "met": min(values) >= TARGET_PSNR_DB}
    for name, e in passed.items():
        if "psnr_db_vs_fp32_reference" in e:
            out.setdefault("psnr_db", {})[name] = {"db": e["psnr_db_vs_fp32_reference"],
                                                  "target_db": TARGET_PSNR_DB,
                                                  "met": e["psnr_db_vs_fp32_reference"] >= TARGET_PSNR_DB}
    b16 = [e for n, e in passed.items() if e["batch"] == 16]
    if b16:
        best = max(b16, key=lambda e: e["images_per_s"])
        out["throughput_batch16"] = {"images_per_s": best["images_per_s"], "backend": best["backend"]}
    if ctx.baseline and best_b1:
        seconds = ctx.baseline.get("whole_s", ctx.baseline["estimate_s"])
        out["speedup_vs_baseline"] = {"baseline_s": seconds, "baseline_timed_whole": "whole_s" in ctx.baseline,
                                      "pipeline_s": best_b1["median_s"], "speedup": seconds / best_b1["median_s"]}
    peak = ctx.peaks.get("bf16")
    if peak:
        shares = {}
        for row in ctx.rows:
            if row.flops and row.timing:
                key = f"{row.stage}/{row.backend}/{row.precision}/b{row.batch}"
                shares[key] = row.flops / row.timing.median / peak
        out["roofline_share_bf16"] = shares
        out["bf16_matmul_peak_flops"] = peak
    return out


def read_tests(xml: Path | None, log: Path | None = None) -> dict:
    """The GPU tests as pytest reported them in its JUnit XML (`--junitxml`): its counts, the failed
    tests and why tests were skipped; without the file (not run, or killed by its timeout) the end
    of pytest's output."""
    if xml is None or not xml.is_file():
        tail = log.read_text(errors="replace")[-3000:] if log is not None and log.is_file() else ""
        return {"status": "not run or not finished" if tail else "not run", "log_tail": tail}
    suite = ET.parse(xml).getroot().find("testsuite")  # pytest writes <testsuites><testsuite ...>
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = [{"test": f"{case.get('classname')}::{case.get('name')}", "message": (node.get("message") or "")[:500]}
              for case in suite.iter("testcase") for node in case if node.tag in ("failure", "error")]
    skipped = Counter((node.get("message") or "")[:200] for node in suite.iter("skipped"))
    return {"status": "failed" if failed else "ok", **counts, "failed": failed, "skipped_reasons": dict(skipped)}


def read_log(path: Path | None) -> dict | None:
    if path is None or not path.is_file():
        return None
    text = path.read_text(errors="replace")
    return {"tail": text[-3000:]}


def print_table(ctx: Context, suite: Suite, tgt: dict) -> None:
    print("\nstage          backend        prec  batch   median        TFLOP/s  share-bf16  note")
    peak = ctx.peaks.get("bf16")
    for r in ctx.rows:
        rate = r.flops / r.timing.median if r.timing and r.flops else 0.0
        share = f"{rate / peak:9.1%}" if peak and rate else "        -"
        print(f"{r.stage:14s} {r.backend:14s} {r.precision:5s} {r.batch:5d} {r.timing.median * 1e3:10.2f} ms "
              f"{rate / 1e12:8.1f} {share}   {r.note[:60]}")
    print("\nparts: " + ", ".join(f"{k}={v['status']}" for k, v in suite.parts.items()))
    print("targets: " + json.dumps(tgt, default=lambda o: round(o, 4) if isinstance(o, float) else str(o)))


def save(ctx: Context, suite: Suite, env: dict, finished: bool) -> tuple[Path, dict]:
    """Write the results JSON (after every part, so a run killed at its time limit keeps what it
    measured) and copy it into $OUT when set."""
    args, device = ctx.args, ctx.device
    tgt = targets(ctx)
    info = machine(device)
    extra = {
        "suite": {"mode": "quick" if args.quick else "full", "finished": finished, "config": args.config,
                  "model": ctx.model_source, "sampler": SAMPLER, "steps": DEFAULT_STEPS[SAMPLER],
                  "budget_s": args.budget_s, "compile_mode": args.compile_mode, "parts": suite.parts},
        "environment": env,
        "build": {"status": args.build_status, **(read_log(args.build_log) or {})},
        "tests": read_tests(args.tests_xml, args.tests_log),
        "end_to_end": ctx.e2e,
        "ranks": ctx.ranks,
        "baseline": {k: v for k, v in ctx.baseline.items() if not k.startswith("_")},
        "targets": tgt,
        "copy_bandwidth_bytes_per_s": ctx.bandwidth,
        "failed": ctx.failed,
        "tolerances": tolerances(),
    }
    name = ("gpu-" if device.type == "cuda" else "gpu-dryrun-") + machine_slug(info)
    # The first save claims a fresh name; later ones rewrite that file.
    path = write_results(ctx.rows, ctx.peaks, name, args.out, extra, device,
                         suffix="-quick" if args.quick else "", path=ctx.results_path)
    ctx.results_path = path
    if os.environ.get("OUT"):
        shutil.copy(path, Path(os.environ["OUT"]) / path.name)
    return path, tgt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="dry run: tiny model, few repeats (works on the CPU, CUDA parts skipped)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", default=None, help="model preset (default: paper; tiny with --quick)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="seconds for all parts")
    parser.add_argument("--reserve-s", type=float, default=30.0,
                        help="seconds kept back from the whole baseline loop for the parts after it")
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode of the torch-compile rows (default, or max-autotune-no-cudagraphs)")
    parser.add_argument("--compile-s", type=float, default=150.0,
                        help="seconds a torch.compile build (+ capture) is expected to need at most")
    parser.add_argument("--tests-xml", type=Path, default=None, help="pytest JUnit XML of the GPU tests")
    parser.add_argument("--tests-log", type=Path, default=None, help="pytest's output")
    parser.add_argument("--build-log", type=Path, default=None, help="log of the extension build")
    parser.add_argument("--build-status", default=None, help="exit status of the extension build")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default: benchmarks/results; a temporary folder with --quick)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / "bsldm_gpu_suite" if args.quick else RESULTS
    args.config = args.config or ("tiny" if args.quick else "paper")
    device = torch.device(args.device)
    if device.type == "cuda":
        # cuDNN picks the fastest convolution per shape during warm-up, before capture.
        torch.backends.cudnn.benchmark = True
    suite = Suite(args.budget_s, device)
    ctx = Context(args, device)
    ctx.left = suite.left

    env: dict = {}
    suite.after = lambda: save(ctx, suite, env, finished=False)
    env.update(suite.part("environment", lambda: part_environment(ctx)) or {})
    suite.part("matmul-peaks", lambda: part_peaks(ctx))
    suite.part("model", lambda: part_model(ctx))
    if ctx.model is None:
        print("no model: nothing more to run", flush=True)
    else:
        suite.part("fp32-reference", lambda: part_reference(ctx), need_s=20)
        suite.part("torch-bf16-b1", lambda: _e2e(ctx, "torch-bf16-b1", _torch_runner(ctx, "bf16"), "bf16", 1,
                                                 stages=True), need_s=30)

        def compiled_b1():
            _needs_cuda(ctx, "torch.compile into the CUDA graph")
            return _e2e(ctx, "torch-compile-bf16-b1", _torch_runner(ctx, "bf16", compile=True), "bf16", 1,
                        stages=True, keep_runner=True)
        suite.part("torch-compile-bf16-b1", compiled_b1, need_s=args.compile_s)
        suite.part("baseline-sampled", lambda: part_baseline_sampled(ctx), need_s=20)

        def fp16_b1():
            _needs_cuda(ctx, "fp16 (CPU fp16 convolutions are too slow for a dry run)")
            return _e2e(ctx, "torch-fp16-b1", _torch_runner(ctx, "fp16"), "fp16", 1)
        suite.part("torch-fp16-b1", fp16_b1, need_s=30)
        suite.part("psnr-demo-model", lambda: part_psnr_demo(ctx), need_s=30)
        suite.part("multi-gpu-ranks", lambda: part_ranks(ctx), need_s=90)
        suite.part("torch-bf16-b16", lambda: _e2e(ctx, "torch-bf16-b16", _torch_runner(ctx, "bf16"), "bf16", 16),
                   need_s=40)
        suite.part("baseline-whole", lambda: part_baseline_whole(ctx), need_s=10)

        def compiled_b16():
            _needs_cuda(ctx, "torch.compile into the CUDA graph")
            if ctx.compiled_runner is None:
                raise Skip("the batch-1 torch-compile part did not run")
            runner = ctx.compiled_runner  # the same compiled modules: inductor recompiles for batch 16
            return _e2e(ctx, "torch-compile-bf16-b16", lambda: runner, "bf16", 16)
        suite.part("torch-compile-bf16-b16", compiled_b16, need_s=args.compile_s * 0.6)

        def tensorrt():
            raise Skip("TensorRT is not installed here" if not env.get("tensorrt")
                       else "engines are built per model directory (bsldm-fast build-engine); "
                            "the suite's random model has none")
        suite.part("tensorrt", tensorrt)
        suite.part("baseline-row", lambda: baseline_row(ctx))

    path, tgt = save(ctx, suite, env, finished=True)
    try:
        print_table(ctx, suite, tgt)
    except Exception:  # noqa: BLE001 - the JSON is written; a broken table must not hide it
        traceback.print_exc()
    print(f"\nwrote {path}", flush=True)
    failed = [k for k, v in suite.parts.items() if v["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
