"""`backend="auto"` on the CPU: for each network, the fastest runner measured on this CPU.

What runs fastest depends on the CPU (AMX, AVX-512 BF16/VNNI or neither), the library versions,
the model's size and the precision, so it is measured, not guessed: `bsldm-fast tune MODEL_DIR`
times every installed CPU runner (eager torch, torch.compile, OpenVINO) on each network (the VQ
encoder, the U-Net, the VQ decoder) after checking its output against the float32 eager reference
within the precision's bound, and writes the table to MODEL_DIR/engines/cpu-backends.json, keyed
by the CPU's model name and flags, the versions and the weights. `backend="auto"` then runs each
network on its fastest checked runner (`runners.StageRunner`); without a table for this CPU and
precision it runs eager torch and logs how to make one. A runner that fails its check is
recorded with its error and never chosen. Tuned for 'int8', OpenVINO runs the networks that passed
the model's int8 quality gate in int8 (engines/int8.py) and the others run bf16, each row saying
what it ran in: auto at int8 then picks per network among them.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import __version__
from .._files import atomic_write
from ..modeldir import Model
from .cache import cpu_identity, model_hash
from .onnx_export import relative_error

logger = logging.getLogger(__name__)

TABLE_FILE = "cpu-backends.json"
NETWORKS = ("encoder", "unet", "decoder")
CPU_BACKENDS = ("torch", "torch-compile", "openvino")
REL_MAX_ERROR = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 3e-2, "int8": 1e-1}
"""max |out - ref| / max |ref| against the float32 eager output, for the U-Net and the decoder.
bf16 keeps 8 significant bits (2e-3 per operation); through the U-Net the eager bf16 error is
~1e-2. A wrong layout lands far above these (benchmarks/checks.py uses the same bounds). int8
quantises activations per tensor to 8 bits (the bundled model's gated int8 networks on a phantom:
U-Net 2.6e-2, decoder 4.6e-2): this only catches a broken graph; whether its images are good
enough is the held-out quality gate's verdict (engines/int8.py)."""
MAX_CODE_FLIPS = {"fp32": 1e-3, "bf16": 0.1, "fp16": 0.1, "int8": 0.25}
"""The encoder's output is quantised: a rounding difference can move a latent vector that sits
near the boundary of two codes to the other code, a jump of a whole code distance. So the encoder
is judged by the share of latent positions whose code differs from float32's: a few near-ties
(bf16 on the `tiny` random model, whose codebook is random: 1-2 %; the bundled model on a
phantom: 4.6 %), never a layout error (~all). The bundled model's int8 encoder, which passed the
quality gate (0.15 dB below bf16 on the held-out pair), changes 12 % of a phantom's codes, to
near neighbours: int8's bound is looser, and still far from a broken graph."""


def check(network: str, out: torch.Tensor, ref: torch.Tensor, precision: str) -> tuple[bool, float, str]:
    """(passed, value, what was measured) of a network's output against float32 eager torch."""
    if out.shape != ref.shape:
        return False, float("inf"), f"shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    if network == "encoder":
        flips = float((out != ref).any(dim=1).float().mean())
        return flips <= MAX_CODE_FLIPS[precision], flips, f"share of changed codes {flips:.3g}"
    error = relative_error(out.numpy(), ref.numpy()) if torch.isfinite(out).all() else float("inf")
    return error <= REL_MAX_ERROR[precision], error, f"max error / max |ref| {error:.3g}"


def cpu_key() -> dict[str, str]:
    """What a measurement holds for: the CPU model and its flags (`cache.cpu_identity`, as the
    OpenVINO cache keys it), the runtimes' versions."""
    name, flags = cpu_identity()
    key = {"cpu": name, "flags": flags, "torch": torch.__version__, "bsldm_fast": __version__}
    try:
        import openvino

        key["openvino"] = openvino.__version__
    except ImportError:
        key["openvino"] = ""
    return key


@dataclass(frozen=True)
class Measurement:
    network: str
    backend: str
    precision: str
    batch: int
    seconds: float | None
    """Median of the timed calls; None when the runner could not run or failed its check."""
    rel_error: float | None
    """The `check` value against float32 eager torch (the encoder: share of changed codes)."""
    note: str = ""
    tuned_for: str = ""
    """The precision the pipeline was tuned for (`precision` is what this network ran in): they
    differ at 'int8', where runners without int8 networks run bf16. '' means `precision`."""


def _tuned_for(row: dict) -> str:
    return row.get("tuned_for") or row["precision"]


def network_inputs(model: Model, batch: int = 1, seed: int = 0,
                   reference=None) -> dict[str, tuple[torch.Tensor, ...]]:
    """Real-looking inputs of each network, what it sees in use: synthetic chest phantoms (seeds
    `seed`...) as the encoder's images; their float32 latents (`reference`'s encoder, eager fp32
    torch by default) as the decoder's; and for the U-Net at t = 500 those latents noised as the
    schedule does, beside the conditioning CXR latent. Uniform noise is no radiograph: the
    codebook's near-ties, and int8's activation ranges, differ on it."""
    from ..data.phantom import generate
    from ..diffusion.conditioning import condition_scale, scale_condition
    from ..diffusion.schedule import Schedule
    from ..preprocess import model_input
    from .runners import make_runner

    config = model.config
    if reference is None:
        reference = make_runner(config, model.vqgan, model.unet, "cpu", "fp32", "torch")
    images = torch.cat([model_input(generate(seed + i, config.image_size).cxr, config).tensor
                        for i in range(batch)])
    with torch.inference_mode():
        latents = reference.encode(images).float()
    t = torch.full((batch,), 500, dtype=torch.int64)
    alpha_bar = Schedule.from_config(config.diffusion).alphas_cumprod[t].float().view(-1, 1, 1, 1)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    x_t = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
    cond = scale_condition(latents, t, condition_scale(config.diffusion))
    return {"encoder": (images,), "unet": (torch.cat([x_t, cond], dim=1), t), "decoder": (latents,)}


def network_call(runner, network: str) -> Callable[..., torch.Tensor]:
    """The runner's call for `network` ('encoder', 'unet' or 'decoder')."""
    return {"encoder": runner.encode, "unet": runner.denoise, "decoder": runner.decode}[network]


def measure(model: Model, precision: str, batch: int = 1, backends: Sequence[str] = CPU_BACKENDS,
            repeats: int = 3, model_dir: str | Path | None = None,
            progress: Callable[[str], None] | None = None) -> list[Measurement]:
    """Each backend's seconds per call of each network, after its accuracy check. At 'int8' the
    runners with int8 networks (OpenVINO) are measured at int8 and the others at bf16
    (`runners.runner_precision`): auto at int8 picks per network among them all."""
    from .runners import backend_unavailable, make_runner, runner_precision

    reference = make_runner(model.config, model.vqgan, model.unet, "cpu", "fp32", "torch")
    inputs = network_inputs(model, batch, reference=reference)
    with torch.inference_mode():
        expected = {n: network_call(reference, n)(*inputs[n]) for n in NETWORKS}
    results = []
    for backend in backends:
        runs_at = runner_precision(backend, precision)
        why = backend_unavailable(backend, torch.device("cpu"))
        if why is not None:
            results += [Measurement(n, backend, runs_at, batch, None, None, why, precision) for n in NETWORKS]
            continue
        runner = make_runner(model.config, model.vqgan, model.unet, "cpu", runs_at, backend,
                             model_dir=model_dir, freeze=("unet",))
        float_networks = _float_networks(runner)
        for network in NETWORKS:
            # A network the int8 runner runs in bf16 (its gate refused it) is a bf16 row.
            row_precision = "bf16" if network in float_networks else runs_at
            call = network_call(runner, network)
            with torch.inference_mode():
                try:
                    out = call(*inputs[network])  # the warm-up: compiles what compiles lazily
                except Exception as error:  # noqa: BLE001 - any failure disqualifies the runner
                    results.append(Measurement(network, backend, row_precision, batch, None, None,
                                               f"{type(error).__name__}: {error}", precision))
                    continue
                passed, error, what = check(network, out, expected[network], row_precision)
                if not passed:
                    results.append(Measurement(network, backend, row_precision, batch, None, error,
                                               f"output off: {what}", precision))
                    continue
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    call(*inputs[network])
                    times.append(time.perf_counter() - start)
            note = float_networks.get(network, "")
            results.append(Measurement(network, backend, row_precision, batch, statistics.median(times),
                                       error, note, precision))
            if progress is not None:
                progress(f"{network} {backend} {row_precision}: {statistics.median(times):.3f} s "
                         f"(error {error:.2g})" + (f"; {note}" if note else ""))
    return results


def _float_networks(runner) -> dict[str, str]:
    """network -> why an 'int8' runner runs it in bf16 (`OpenVINORunner.int8_refusals`: its quality
    gate refused it, or it has no int8 IR), for the networks it does; empty for any other runner."""
    if runner.precision != "int8":
        return {}
    return {n: f"runs bf16: {why}" for n, why in runner.int8_refusals.items() if why is not None}


def write_table(model_dir: str | Path, measurements: Sequence[Measurement]) -> Path:
    """Merge the measurements into MODEL_DIR/engines/cpu-backends.json (the rows tuned for other
    precisions kept)."""
    model_dir = Path(model_dir)
    path = model_dir / "engines" / TABLE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    key = {**cpu_key(), "weights": model_hash(model_dir)}
    rows = []
    old = _read(path)
    if old is not None and old.get("key") == key:
        tuned = {m.tuned_for or m.precision for m in measurements}
        rows = [r for r in old["rows"] if _tuned_for(r) not in tuned]
    rows += [asdict(m) for m in measurements]
    text = json.dumps({"key": key, "rows": rows}, indent=1) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def fastest(model_dir: str | Path | None, precision: str, batch: int = 1) -> dict[str, str] | None:
    """network -> the fastest checked backend, from the table measured on this CPU for these
    weights and versions at this precision; None when there is none (or it is stale). At 'int8' the
    candidates are the rows `tune --precision int8` measured: each runner at what it runs then."""
    if model_dir is None:
        return None
    model_dir = Path(model_dir)
    table = _read(model_dir / "engines" / TABLE_FILE)
    if table is None:
        return None
    if table.get("key") != {**cpu_key(), "weights": model_hash(model_dir)}:
        logger.info("the CPU backend table of %s was measured elsewhere (or for other weights or "
                    "versions); rerun `bsldm-fast tune`", model_dir)
        return None
    choice = {}
    for network in NETWORKS:
        timed = [r for r in table["rows"] if r["network"] == network and _tuned_for(r) == precision
                 and r["batch"] == batch and r["seconds"] is not None]
        if not timed:
            return None
        choice[network] = min(timed, key=lambda r: r["seconds"])["backend"]
    return choice
