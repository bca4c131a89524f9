"""The one timing helper every benchmark shares: warm-up, repeats, median and spread, peak memory."""

from __future__ import annotations

import gc
import json
import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bsldm_fast.config import ModelConfig
from bsldm_fast.models import UNet


@dataclass
class Timing:
    """Seconds per call over `repeats` calls after `warmup` calls."""

    median: float
    minimum: float
    maximum: float
    repeats: int
    peak_rss_mib: float
    """Peak resident memory of this process so far (the CPU analogue of max_memory_allocated)."""


def measure(fn: Callable[[], object], warmup: int = 1, repeats: int = 3) -> Timing:
    for _ in range(warmup):
        fn()
    gc.collect()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return Timing(statistics.median(times), min(times), max(times), repeats, peak)


def matmul_peak(dtype: torch.dtype, sizes: tuple[int, ...] = (2048, 4096), repeats: int = 3) -> float:
    """The machine's measured dense matmul rate in FLOP/s for `dtype` (the roofline's ceiling):
    the best of a few square sizes, since small ones under-fill the cores."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        t = measure(lambda: a @ b, warmup=1, repeats=repeats)
        best = max(best, 2 * n**3 / t.minimum)
    return best


def unet_flops(config: ModelConfig, batch: int = 1) -> int:
    """Forward FLOPs of one U-Net evaluation, counted by torch's FlopCounterMode on a meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet(config.unet)
        x = torch.empty(batch, config.unet.in_channels, config.latent_size, config.latent_size)
        t = torch.zeros(batch, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        unet(x, t)
    return int(counter.get_total_flops())


@dataclass
class Row:
    stage: str
    backend: str
    precision: str
    batch: int
    resolution: int
    sampler: str = "-"
    steps: int = 0
    timing: Timing | None = None
    flops: float = 0.0

    @property
    def rate(self) -> float:
        return self.flops / self.timing.median if self.timing and self.flops else 0.0


def machine() -> dict:
    return {
        "host": platform.node(),
        "processor": platform.processor() or platform.machine(),
        "cpus": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def write_results(rows: list[Row], peaks: dict[str, float], name: str, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    info = machine()
    path = out_dir / f"{name}-{info['date']}.json"
    payload = {
        "machine": info,
        "matmul_peak_flops": peaks,
        "rows": [dict(asdict(r), achieved_flops=r.rate) for r in rows],
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
