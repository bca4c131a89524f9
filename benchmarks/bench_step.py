"""Per-step overhead outside the U-Net: the original-style loop against the fused step kernels.

    python benchmarks/bench_step.py [--batches 1 8] [--steps 20] [--repeats 5] [--device cpu|cuda]

The U-Net is replaced by a stub returning a fixed [B, 8, h, w] tensor, so what is timed is all the
rest of a denoising step at the paper's latent size (4 x 128 x 128):

- original: what BS-LDM's `ldm_eval.py` does around its U-Net call: the timestep tensor built on
  the host, diffusers' `DDPMScheduler.step` on all 8 channels (~15 small tensor ops and a randn),
  the scheduler rebuilt with the next clip range (1000 betas computed in Python), torch.cat of the
  condition, and channel 0 copied to the host as a NumPy preview;
- reference: bsldm_fast's unfused PyTorch samplers (diffusion/samplers.py) with the Philox noise;
- fused: one kernel per step (bsldm_fast.kernels, backend 'auto') writing into the U-Net input.

Also reports each fused kernel's achieved memory bandwidth (bytes it must read and write / time)
against the copy bandwidth measured on the same device for a copy of the same bytes (so both sit
in the same level of the cache hierarchy; a 64 MiB copy is reported too). The target is >= 70 % on a
GPU for batch >= 8; on a CPU the noise draw makes DDPM compute-bound. Writes
benchmarks/results/step-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from checks import check_finite, check_output, tolerances  # noqa: E402
from original_style import make_scheduler  # noqa: E402
from timing import copy_bandwidth, cpu_seconds, machine, measure, sync  # noqa: E402

from bsldm_fast import kernels  # noqa: E402
from bsldm_fast.config import DiffusionConfig  # noqa: E402
from bsldm_fast.diffusion import Schedule  # noqa: E402
from bsldm_fast.diffusion.noise import StepNoise, seed_tensor  # noqa: E402
from bsldm_fast.diffusion.plan import make_plan  # noqa: E402
from bsldm_fast.diffusion.samplers import ddpm_update  # noqa: E402

CHANNELS, SIZE = 4, 128


def original_steps(batch: int, steps: int, device: torch.device, diffusion: DiffusionConfig):
    """`steps` iterations of the original loop's body around a stub U-Net."""
    eps8 = torch.randn(batch, 2 * CHANNELS, SIZE, SIZE, device=device)
    cxr = torch.randn(batch, CHANNELS, SIZE, SIZE, device=device)
    state = {"sample": torch.cat((torch.randn_like(cxr), cxr), dim=1),
             "scheduler": make_scheduler(diffusion, diffusion.clip_range_start)}

    def stub(sample, t):
        return eps8

    def run():
        scheduler, sample = state["scheduler"], state["sample"]
        timesteps = scheduler.timesteps
        for j in range(steps):
            t = timesteps[j]
            residual = stub(sample, torch.Tensor((t,)).to(device).long()).to(device)
            sample = scheduler.step(residual, t, sample).prev_sample
            scheduler = make_scheduler(diffusion, diffusion.clip_range_start + diffusion.clip_range_rate * j)
            sample = torch.cat((sample[:, :CHANNELS], cxr), dim=1)
            _ = np.clip(np.squeeze(sample[:, 0].detach().to("cpu").numpy()) * 0.5 + 0.5, 0, 1)
        sync(device)
        run.output = sample
        state["sample"] = torch.cat((torch.randn_like(cxr), cxr), dim=1)

    return run


def reference_steps(batch: int, steps: int, device: torch.device, schedule: Schedule):
    """bsldm_fast's unfused reference DDPM steps (samplers.ddpm_update + Philox noise tensors)."""
    eps8 = torch.randn(batch, 2 * CHANNELS, SIZE, SIZE, device=device)
    u = torch.randn(batch, 2 * CHANNELS, SIZE, SIZE, device=device)
    plan = make_plan("ddpm", schedule, schedule.num_timesteps)
    noise = StepNoise(list(range(batch)), (CHANNELS, SIZE, SIZE), device)

    def run():
        x = u[:, :CHANNELS].clone()
        for i in range(steps):
            eps = eps8[:, :CHANNELS]
            x = ddpm_update(x, eps, plan.entries[i], noise(i))
            u[:, :CHANNELS] = x
        sync(device)
        run.output = x

    return run


def fused_steps(name: str, batch: int, steps: int, device: torch.device, schedule: Schedule, backend: str):
    """`steps` fused kernel steps of sampler `name`, in place in U [B, 8, h, w]."""
    eps8 = torch.randn(batch, 2 * CHANNELS, SIZE, SIZE, device=device)
    u = torch.randn(batch, 2 * CHANNELS, SIZE, SIZE, device=device)
    x, eps = u[:, :CHANNELS], eps8[:, :CHANNELS]
    # Seeded like the rest: DPM-Solver++ steps read it (an empty buffer made the output undefined).
    x0 = torch.randn_like(x)
    seeds = seed_tensor(range(batch), device)
    # Mid-trajectory steps: the DPM-Solver++ ones are second order (they read prev_x0).
    plan = make_plan(name, schedule, 1000 if name == "ddpm" else 50).entries[1 : 1 + steps]

    def run():
        for i, p in enumerate(plan):
            if name == "ddpm":
                kernels.ddpm_step(x, eps, seeds, i, p, x, backend=backend)
            elif name == "ddim":
                kernels.ddim_step(x, eps, seeds, i, p, x, backend=backend)
            else:
                kernels.dpmpp_2m_step(x, eps, x0, p, x, x0, backend=backend)
        sync(device)
        run.output = x

    return run


def check_case(label: str, fn, name: str | None, batch: int, steps: int, device: torch.device,
               schedule: Schedule):
    """The correctness check of a loop's first run (which is also its warm-up): a fused kernel
    against the same steps from the same state through the unfused reference ops (backend
    'reference', float32); the original loop (its own noise) and the reference itself: finite."""
    fn()
    if name is None:
        why = ("the reference itself" if label.startswith("reference")
               else "the original loop draws its own noise (diffusers' scheduler)")
        return check_finite(fn.output, "fp32", why)
    torch.manual_seed(0)
    fast = fused_steps(name, batch, steps, device, schedule, kernels.resolve("auto", device))
    torch.manual_seed(0)
    ref = fused_steps(name, batch, steps, device, schedule, "reference")
    fast()
    ref()
    return check_output(fast.output, ref.output, "fp32")


# Bytes each fused step must move per latent element: x read + eps read + x_{t-1} written,
# plus prev_x0 read and x0 written for DPM-Solver++.
BYTES_PER_ELEMENT = {"ddpm": 12, "ddim": 12, "dpmpp": 20}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=20, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch and the C++ kernels (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)  # also the OpenMP team of the C++ kernels
    diffusion = DiffusionConfig()
    schedule = Schedule.from_config(diffusion)
    backend = kernels.resolve("auto", device)
    bandwidth = copy_bandwidth(device, args.repeats)
    rows = []
    print(f"device {device}, fused backend '{backend}', torch threads {torch.get_num_threads()}, "
          f"64 MiB copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"{'batch':>5} {'loop':<22} {'ms/step':>9} {'cpu ms/step':>11} {'vs original':>11} "
          f"{'GB/s':>7} {'of copy':>8}")
    with torch.inference_mode():
        for batch in args.batches:
            cases = [("original (diffusers)", original_steps(batch, args.steps, device, diffusion), None),
                     ("reference (unfused)", reference_steps(batch, args.steps, device, schedule), None)]
            cases += [(f"fused {name} [{backend}]", fused_steps(name, batch, args.steps, device, schedule, backend),
                       name) for name in ("ddpm", "ddim", "dpmpp")]
            baseline = None
            for label, fn, sampler in cases:
                # Correctness before timing: a loop whose output is wrong is recorded, never timed.
                check = check_case(label, fn, sampler, batch, args.steps, device, schedule)
                if not check.passed:
                    rows.append({"batch": batch, "loop": label, "failed": check.summary(), "check": check.as_dict()})
                    print(f"{batch:>5} {label:<22} FAILED its correctness check: {check.summary()}")
                    continue
                per_step = measure(fn, 0, args.repeats).median / args.steps
                cpu_per_step = cpu_seconds(fn, args.repeats) / args.steps if device.type == "cpu" else None
                # The speed-up is taken on CPU time on the CPU (see cpu_seconds), on wall time on a GPU.
                basis = cpu_per_step if cpu_per_step else per_step
                if label.startswith("original"):
                    baseline = basis  # ratios only against the original loop, and only if it passed
                row = {"batch": batch, "loop": label, "seconds_per_step": per_step,
                       "cpu_seconds_per_step": cpu_per_step, "speedup_vs_original": baseline / basis if baseline else None,
                       "check": check.as_dict()}
                text = ""
                if sampler is not None:
                    moved = BYTES_PER_ELEMENT[sampler] * batch * CHANNELS * SIZE * SIZE
                    same_size = copy_bandwidth(device, args.repeats, moved // 8)
                    achieved = moved / basis
                    row.update(bytes_per_s=achieved, copy_bytes_per_s_same_size=same_size,
                               share_of_copy=achieved / same_size)
                    text = f"{achieved / 1e9:7.1f} {100 * achieved / same_size:7.0f}%"
                rows.append(row)
                cpu_text = f"{1e3 * cpu_per_step:11.3f}" if cpu_per_step else f"{'-':>11}"
                print(f"{batch:>5} {label:<22} {1e3 * per_step:9.3f} {cpu_text} {baseline / basis if baseline else math.nan:10.1f}x {text}")
    info = machine()
    info.update(device=str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
                fused_backend=backend, copy_bytes_per_s_64mib=bandwidth, steps_per_run=args.steps,
                latent=[CHANNELS, SIZE, SIZE], load_average=list(os.getloadavg()))
    args.out.mkdir(parents=True, exist_ok=True)
    threads = f"-t{torch.get_num_threads()}" if device.type == "cpu" else ""
    path = args.out / f"step-{device.type}{threads}-{time.strftime('%Y-%m-%d', time.gmtime())}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"machine": info, "rows": rows, "tolerances": tolerances()}, indent=2) + "\n")
    tmp.replace(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
