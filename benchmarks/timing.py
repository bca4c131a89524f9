"""The one timing helper every benchmark shares: warm-up, repeats, median and spread, peak memory."""

from __future__ import annotations

import gc
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bsldm_fast.config import ModelConfig
from bsldm_fast.models import VQGAN, UNet


@dataclass
class Timing:
    """Seconds per call over `repeats` calls after `warmup` calls."""

    median: float
    minimum: float
    maximum: float
    repeats: int
    peak_rss_mib: float
    """Peak memory during the timed calls, MiB: resident set on the CPU, `max_memory_allocated` on a
    GPU (see `mem_kind`). On the CPU it is per measurement where the kernel lets us reset the peak."""
    mem_kind: str = "rss"
    times: list[float] = field(default_factory=list)

    @property
    def spread(self) -> float:
        """(max - min) / median: the relative spread of the repeats."""
        return (self.maximum - self.minimum) / self.median if self.median else 0.0


def sync(device: torch.device | str | None) -> None:
    """Wait for the device's queued work (a no-op off CUDA): a wall time must include it."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mib(resettable: bool) -> float:
    if resettable:
        with open("/proc/self/status") as f:
            match = re.search(r"VmHWM:\s+(\d+) kB", f.read())
        if match:
            return int(match.group(1)) / 1024
    # NOTE: ru_maxrss is the peak of the whole process so far, an upper bound for this measurement.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(fn: Callable[[], object], warmup: int = 1, repeats: int = 3,
            device: torch.device | str | None = None) -> Timing:
    """Time `fn` after `warmup` untimed calls; on a GPU each call is synchronised and peak memory is
    the allocator's, on the CPU it is the resident set."""
    cuda = device is not None and torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    sync(device)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    resettable = False if cuda else _reset_peak_rss()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    if cuda:
        peak, kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda-allocated"
    else:
        peak, kind = _peak_rss_mib(resettable), "rss"
    return Timing(statistics.median(times), min(times), max(times), repeats, peak, kind, times)


def cpu_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median CPU time of `fn` over `repeats` calls after one warm-up: on a shared, oversubscribed
    machine wall time measures the other tenants, CPU time (with one thread) the work itself."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device: torch.device | str, repeats: int, numel: int = 16 * 2**20) -> float:
    """Measured device copy bandwidth, bytes/s (read + write), copying `numel` float32 values: the
    roofline of a memory-bound step. Ten copies per call, so that a small copy is not all launch
    and sync; on the CPU the median CPU time (`cpu_seconds`), on a GPU the fastest wall time."""
    device = torch.device(device)
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)

    def run():
        for _ in range(10):
            dst.copy_(src)
        sync(device)

    if device.type == "cpu":
        seconds = cpu_seconds(run, repeats)
    else:
        seconds = measure(run, warmup=2, repeats=repeats, device=device).minimum
    return 10 * 2 * src.numel() * 4 / seconds


def matmul_peak(dtype: torch.dtype, sizes: tuple[int, ...] = (2048, 4096), repeats: int = 3,
                device: torch.device | str = "cpu") -> float:
    """The machine's measured dense GEMM rate in FLOP/s for `dtype` (the roofline's ceiling): the
    best of a few square sizes, since small ones under-fill the cores. On the CPU the same GEMM also
    runs as a 1x1 convolution, since torch has two GEMM libraries there and the better one differs
    by precision and vendor (MKL's float32 matmul reaches half of oneDNN's on AMD EPYC)."""
    best = 0.0
    with torch.inference_mode():
        for n in sizes:
            a = torch.randn(n, n, device=device).to(dtype)
            b = torch.randn(n, n, device=device).to(dtype)
            gemms = [lambda: a @ b]
            if torch.device(device).type == "cpu":
                gemms.append(gemm_as_conv(a, b))
            for gemm in gemms:
                t = measure(gemm, warmup=1, repeats=repeats, device=device)
                best = max(best, 2 * n**3 / t.minimum)
    return best


INT8_UNIT = "int8 ops/s, counted as 2*M*N*K (one multiply and one add per MAC), like FLOP/s"


def int8_gemm_peak(sizes: tuple[int, ...] = (2048, 4096), repeats: int = 3) -> dict:
    """The machine's measured dense int8 GEMM rate on the CPU (the int8 rows' ceiling), in
    `INT8_UNIT`: the best of the candidates that run here, each at a few square sizes, timed like
    `matmul_peak` (minimum of `repeats` after a warm-up). Candidates:

    - `torch._int_mm` (int8 x int8 -> int32, oneDNN/MKL);
    - OpenVINO's CPU plugin on a one-MatMul model, the pattern NNCF's int8 IRs have: FakeQuantize
      (u8 levels) on the activation, int8 weights with a per-channel scale (Convert, Multiply), under
      the bf16 hint the int8 runner uses; and the same MatMul with FakeQuantize on both inputs.
      A candidate counts only where the plugin reports the MatMul/FullyConnected at u8/i8
      (`runtimePrecision`): a plugin that fell back to bf16 would measure the wrong thing.

    Returns {"ops_per_s": best, "how": its candidate, "candidates": {name: ops/s or why not},
    "unit": INT8_UNIT}; ops_per_s is 0.0 when nothing ran."""
    candidates: dict[str, float | str] = {}
    for name, build in (("torch._int_mm", _int_mm_gemm),
                        ("openvino FullyConnected u8 x i8 weights", _ov_int8_gemm(True)),
                        ("openvino MatMul u8 x FakeQuantize", _ov_int8_gemm(False))):
        best = 0.0
        try:
            for n in sizes:
                fn = build(n)
                t = measure(fn, warmup=1, repeats=repeats)
                best = max(best, 2 * n**3 / t.minimum)
        except Exception as error:  # noqa: BLE001 - a candidate that cannot run here is recorded as such
            candidates[name] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            continue
        candidates[name] = best
    rates = {k: v for k, v in candidates.items() if isinstance(v, float)}
    how = max(rates, key=rates.get) if rates else None
    return {"ops_per_s": rates[how] if how else 0.0, "how": how, "candidates": candidates, "unit": INT8_UNIT}


def _int_mm_gemm(n: int) -> Callable[[], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (n, n), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (n, n), dtype=torch.int8, generator=g)
    torch._int_mm(a, b)  # raises where the CPU build has no int8 GEMM
    return lambda: torch._int_mm(a, b)


def _ov_int8_gemm(int8_weights: bool) -> Callable[[int], Callable[[], object]]:
    def build(n: int) -> Callable[[], object]:
        import numpy as np
        import openvino as ov
        import openvino.opset13 as ops

        from bsldm_fast.engines.openvino import runtime_precisions

        def fq(x, low: float, high: float):
            lo, hi = ops.constant(np.float32(low)), ops.constant(np.float32(high))
            return ops.fake_quantize(x, lo, hi, lo, hi, 256)
        rng = np.random.default_rng(0)
        a = ops.parameter([n, n], ov.Type.f32, name="a")
        params = [a]
        if int8_weights:
            w = ops.constant(rng.integers(-127, 128, (n, n)).astype(np.int8))
            b = ops.multiply(ops.convert(w, ov.Type.f32), ops.constant(np.full((1, n), 0.01, np.float32)))
        else:
            p = ops.parameter([n, n], ov.Type.f32, name="b")
            params.append(p)
            b = fq(p, -1.28, 1.27)
        model = ov.Model([ops.matmul(fq(a, 0.0, 2.55), b, False, False)], params)
        compiled = ov.Core().compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY",
                                                          "INFERENCE_PRECISION_HINT": "bf16"})
        precisions = {layer: precision for layer, precision in runtime_precisions(compiled)}
        gemm = precisions.get("FullyConnected", precisions.get("MatMul"))
        if gemm not in ("u8", "i8"):
            raise RuntimeError(f"the plugin ran the GEMM in {gemm}, not int8")
        request = compiled.create_infer_request()
        feeds = [rng.random((n, n), dtype=np.float32) for _ in params]
        return lambda: request.infer(feeds)
    return build


def gemm_as_conv(a: torch.Tensor, b: torch.Tensor) -> Callable[[], torch.Tensor]:
    """`a @ b` (square, n x n, n a multiple of 64) as a 1x1 convolution in channels-last, the layout
    oneDNN takes without copies: [1, n, n/64, 64] * [n, n, 1, 1]. Returns the call; its output is
    the product with pixels as rows, laid out as [1, n, n/64, 64]."""
    n = a.shape[0]
    x = a.reshape(1, n // 64, 64, n).permute(0, 3, 1, 2)
    w = b.t().reshape(n, n, 1, 1).contiguous(memory_format=torch.channels_last)
    return lambda: torch.nn.functional.conv2d(x, w)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of `fn` as torch's FlopCounterMode counts them (matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def unet_flops(config: ModelConfig, batch: int = 1) -> int:
    """Forward FLOPs of one U-Net evaluation, counted by torch's FlopCounterMode on a meta device."""
    with torch.device("meta"):
        unet = UNet(config.unet)
        x = torch.empty(batch, config.unet.in_channels, config.latent_size, config.latent_size)
        t = torch.zeros(batch, dtype=torch.long)
    return count_flops(lambda: unet(x, t))


def vqgan_flops(config: ModelConfig, batch: int = 1) -> tuple[int, int]:
    """(encode, decode) FLOPs of the VQGAN at the config's image size, counted on a meta device."""
    with torch.device("meta"):
        vqgan = VQGAN(config.vqgan)
        images = torch.empty(batch, 1, config.image_size, config.image_size)
        latent = torch.empty(batch, config.vqgan.embedding_dim, config.latent_size, config.latent_size)
    return count_flops(lambda: vqgan.encode_latent(images)), count_flops(lambda: vqgan.decode(latent))


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
    config: str = "-"
    """Model preset the row ran (its architecture; `resolution` may differ from the preset's)."""
    group: str = "stages"
    """'stages', or the scaling series the row belongs to ('scaling-resolution', ...)."""
    note: str = ""
    compile_s: float | None = None
    """One-off compile time, kept out of `timing` (torch.compile, engine builds)."""
    check: dict | None = None
    """The correctness check of the row's first output against the eager float32 reference
    (`checks.Check`); summary.py refuses rows without a passing one."""
    kind: str = "ours"
    """'ours' (a bsldm_fast path), 'peer' (another engine run as a deployment engineer would) or
    'baseline' (the original-style loop)."""

    @property
    def rate(self) -> float:
        return self.flops / self.timing.median if self.timing and self.flops else 0.0

    @property
    def per_image(self) -> float:
        return self.timing.median / self.batch if self.timing else 0.0


def machine(device: torch.device | str = "cpu") -> dict:
    device = torch.device(device)
    info = {
        "host": platform.node(),
        "processor": _cpu_model() or platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": "cpu",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def lscpu() -> dict[str, str]:
    """`lscpu`'s model name and flags ({} where there is no lscpu): every result records both,
    because the CPU model changes between sessions."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return {"model": fields.get("Model name", "").strip(), "flags": fields.get("Flags", "").strip()}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(r"model name\s*:\s*(.+)", f.read())
        return match.group(1).strip() if match else ""
    except OSError:
        return ""


def machine_slug(info: dict) -> str:
    """A file-name-safe machine label: the GPU's name, or 'cpu<N>-<model>' on the CPU."""
    if info["device"] != "cpu":
        text = info["device"]
    else:
        text = f"cpu{info['cpus']}-{info['processor']}"
    text = re.sub(r"\(r\)|\(tm\)|processor|\d+-core", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")[:48]


def row_dict(row: Row, peaks: dict[str, float]) -> dict:
    out = asdict(row)
    timing = out.pop("timing") or {}
    timing.pop("times", None)
    out.update(timing)
    if row.timing:
        out["spread"] = row.timing.spread
        out["times"] = row.timing.times
        out["per_image_s"] = row.per_image
    out["achieved_flops"] = row.rate
    peak = peaks.get(row.precision)
    out["fraction_of_peak"] = row.rate / peak if peak and row.rate else None
    # Every row also against the bf16 GEMM rate, the CPU's fastest float ceiling: one yardstick for
    # an fp32 peer, a bf16 path and an int8 one (whose own fraction above is of the int8 rate).
    bf16 = peaks.get("bf16")
    out["fraction_of_bf16_peak"] = row.rate / bf16 if bf16 and row.rate else None
    return out


def write_results(rows: list[Row], peaks: dict[str, float], name: str, out_dir: Path,
                  extra: dict | None = None, device: torch.device | str = "cpu", suffix: str = "",
                  path: Path | None = None) -> Path:
    """Write `<name>-<date><suffix>.json` and return its path. An earlier result is never replaced:
    when that name is taken the file becomes `...<suffix>-2.json`, `-3`, ... Pass the returned
    `path` back to rewrite the same run's file (a suite that saves after every part)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    info = machine(device)
    payload = {
        "machine": info,
        "matmul_peak_flops": peaks,
        "rows": [row_dict(r, peaks) for r in rows],
        **(extra or {}),
    }
    stem = f"{name}-{info['date']}{suffix}"
    if path is not None:
        tmp = out_dir / f".{stem}.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        tmp.replace(path)
        return path
    return write_new(out_dir, stem, payload)


def write_new(out_dir: Path, stem: str, payload: dict) -> Path:
    """Write `payload` as JSON to `<stem>.json` in `out_dir`, or `<stem>-2.json`, `-3`, ... when
    that name is taken: an earlier result is never replaced. Returns the path written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{stem}.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    for n in range(1, 1000):
        candidate = out_dir / (f"{stem}.json" if n == 1 else f"{stem}-{n}.json")
        try:
            # A hard link claims the name atomically, and only if it is free.
            os.link(tmp, candidate)
        except FileExistsError:
            continue
        tmp.unlink()
        return candidate
    tmp.unlink()
    raise FileExistsError(f"{out_dir} already holds 999 results named {stem}*.json")
