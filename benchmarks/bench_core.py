"""Core CPU benchmarks: the paper-size U-Net step (fp32; bf16 channels-last) and the Suppressor end
to end at `small`, each against a baseline measured in the same run.

    python benchmarks/bench_core.py [--quick]

Prints a table and writes benchmarks/results/core-<host>-<date>.json. Weights are random (speed does
not depend on them). The fuller yardstick (original-style loop, every stage) is benchmarks/run.py's job.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import Row, matmul_peak, measure, unet_flops, write_results  # noqa: E402

from bsldm_fast import Suppressor  # noqa: E402
from bsldm_fast.config import preset  # noqa: E402
from bsldm_fast.modeldir import random_model  # noqa: E402


def unet_rows(name: str, repeats: int) -> list[Row]:
    config = preset(name)
    unet = random_model(config).unet
    s = config.latent_size
    u = torch.randn(1, config.unet.in_channels, s, s)
    t = torch.tensor([500])
    flops = unet_flops(config)
    rows = []
    with torch.inference_mode():
        rows.append(Row("unet-step", "torch-eager", "fp32", 1, config.image_size,
                        timing=measure(lambda: unet(u, t), 1, repeats), flops=flops))
        fast = unet.to(torch.bfloat16).to(memory_format=torch.channels_last)
        u16 = u.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        rows.append(Row("unet-step", "torch-eager channels-last", "bf16", 1, config.image_size,
                        timing=measure(lambda: fast(u16, t), 1, repeats), flops=flops))
    return rows


def suppressor_rows(name: str, baseline_steps: int) -> list[Row]:
    config = preset(name)
    model = random_model(config)
    image = (np.random.default_rng(0).random((1024, 1024)) * 255).astype(np.uint8)
    flops_per_step = unet_flops(config)
    rows = []
    for sampler, steps, precision in (("ddpm", baseline_steps, "fp32"), ("dpmpp", 20, "fp32"),
                                      ("dpmpp", 20, "bf16")):
        s = Suppressor(model, device="cpu", sampler=sampler, steps=steps, precision=precision)
        repeats = 1 if steps > 100 else 3
        timing = measure(lambda: s(image), 1 if repeats > 1 else 0, repeats)
        rows.append(Row("end-to-end", "torch-eager", precision, 1, config.image_size, sampler, steps,
                        timing, flops=flops_per_step * steps))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, 250-step baseline")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    repeats = 1 if args.quick else 3

    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    rows = unet_rows("paper", repeats) + suppressor_rows("small", 250 if args.quick else 1000)

    print(f"measured matmul peak: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")
    header = f"{'stage':<11} {'backend':<26} {'prec':<5} {'res':>5} {'sampler':<8} {'steps':>5} " \
             f"{'median s':>9} {'GFLOP/s':>8} {'of peak':>7} {'vs base':>8}"
    print(header)
    baselines: dict[str, float] = {}
    for row in rows:
        base = baselines.setdefault(row.stage, row.timing.median)
        share = row.rate / peaks[row.precision] if row.rate else 0.0
        print(f"{row.stage:<11} {row.backend:<26} {row.precision:<5} {row.resolution:>5} {row.sampler:<8} "
              f"{row.steps:>5} {row.timing.median:>9.3f} {row.rate / 1e9:>8.1f} {share:>7.1%} "
              f"{base / row.timing.median:>7.1f}x")
    path = write_results(rows, peaks, "core-cpu", args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
