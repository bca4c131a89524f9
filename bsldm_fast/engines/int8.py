"""Int8 U-Net for the CPU: NNCF post-training quantisation of the fp32 ONNX U-Net to an OpenVINO IR,
and the quality gate that decides whether a model may use it.

The calibration set is what the U-Net sees in use (`quantize.calibration_feeds`): radiographs (the
bundled SZCH samples by default) plus a few synthetic phantoms are encoded, sampled with the default
sampler and with DPM-Solver++, and every (U, t) the denoiser is called with is recorded. Never random
tensors: the activation ranges of a diffusion U-Net depend on t and on real-looking latents.

Layout in a model directory (beside the TensorRT engines of engines/cache.py):

    engines/openvino/unet-int8.xml (+ .bin)   the quantised U-Net, float32 I/O "U", "t" -> "eps"
    engines/openvino/unet-int8.xml.json       its manifest (`Int8Key`); any change rebuilds it
    engines/openvino/int8-gate.json           the verdict of benchmarks/int8_gate.py

A model runs the int8 U-Net only when the gate's verdict passed for the IR that is there now
(`int8_refusal` says why not otherwise, for the runner to log before it runs bf16).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .._files import atomic_write
from ..modeldir import Model
from .cache import ENGINE_DIR, EngineError, differences, model_hash, read_manifest, write_manifest

logger = logging.getLogger(__name__)

OPENVINO_DIR = "openvino"
INT8_IR = "unet-int8.xml"
GATE_FILE = "int8-gate.json"
SAMPLE_RADIOGRAPHS = Path(__file__).resolve().parents[2] / "assets" / "szch_samples" / "cxr"
"""The bundled SZCH sample radiographs (a source checkout; absent from an installed wheel)."""
PHANTOM_SEEDS = (0, 1, 2)
CALIBRATION_RUNS = (("ddpm", None, 0), ("ddpm", None, 100), ("dpmpp", 20, 0))
"""(sampler, steps, first seed) of each recorded sampling run: the default sampler at its default
steps twice (two noise draws), and DPM-Solver++, whose timesteps lie in between."""
GATE_PSNR_DB = 0.3
GATE_SSIM = 0.005
"""The gate: int8's mean PSNR/SSIM on held-out real pairs within these of the bf16 pipeline's."""

# NOTE: options, from the eps error (relative RMS vs fp32 torch, float layers in f32) on held-out
# inputs of the bundled model (pair 2's CXR and an unseen phantom, 20 (U, t)); the numbers are in
# benchmarks/results/int8-gate-*.json: PERFORMANCE preset 0.128; ignoring the time embedding
# 0.128; MIXED preset (asymmetric activations, after SiLU) 0.114; full bias correction instead of
# fast: identical; then, one part at a time kept float: first conv 0.089, attention 0.114, skip
# convs 0.111, output conv 0.114 (whole decoder half 0.104, whole encoder half 0.071). So the error
# is spread over the network, and the first convolution (which reads x_t and the CXR latent in one
# per-tensor range) is the one layer worth keeping float. The time embedding and each residual
# block's embedding projection see t only, < 1% of the FLOPs, and stay float too.
IGNORED_PATTERNS = (r".*/time_embed/.*", r".*/emb_layers/.*")
QUANTIZATION_OPTIONS = {"preset": "mixed", "model_type": None, "fast_bias_correction": True,
                        "ignored": "first-conv", "activations_range": "mean_minmax"}


def require_openvino():
    """(openvino, nncf), or EngineError saying how to get them."""
    try:
        import nncf
        import openvino
    except ImportError as error:
        raise EngineError("the int8 U-Net needs OpenVINO and NNCF: "
                          "pip install 'bsldm-fast[int8]' (openvino and nncf)") from error
    return openvino, nncf


def openvino_dir(model_dir: str | Path) -> Path:
    return Path(model_dir) / ENGINE_DIR / OPENVINO_DIR


def int8_ir_path(model_dir: str | Path) -> Path:
    return openvino_dir(model_dir) / INT8_IR


def gate_path(model_dir: str | Path) -> Path:
    return openvino_dir(model_dir) / GATE_FILE


@dataclass(frozen=True)
class Int8Key:
    """What the int8 IR depends on; any change makes it stale."""

    graph: str
    model_hash: str
    openvino_version: str
    nncf_version: str
    calibration: str
    """Digest of the calibration images (as fed to the encoder) and of the sampling runs recorded."""
    options: str
    """The NNCF options, as JSON."""


# Calibration ---------------------------------------------------------------------------------

def calibration_units(model: Model, calibration_images: Sequence[str | Path] | None = None,
                      phantoms: Sequence[int] = PHANTOM_SEEDS) -> tuple[torch.Tensor, list[str]]:
    """([N, 1, S, S] model inputs, their names): the radiographs (default: the bundled samples
    where this is a source checkout) and synthetic phantoms, preprocessed as inference does."""
    from ..data.phantom import generate
    from ..preprocess import model_input
    from .quantize import load_calibration_images

    if calibration_images is None:
        calibration_images = [SAMPLE_RADIOGRAPHS] if SAMPLE_RADIOGRAPHS.is_dir() else []
        if not calibration_images:
            logger.warning("no bundled sample radiographs here; calibrating on phantoms only")
    batches, names = [], []
    if calibration_images:
        from ..io import find_images

        batches.append(load_calibration_images(calibration_images, model.config))
        names += [str(job.source) for job in find_images([str(p) for p in calibration_images])]
    size = model.config.image_size
    for seed in phantoms:
        batches.append(model_input(generate(seed, size).cxr, model.config).tensor)
        names.append(f"phantom:{seed}@{size}")
    if not batches:
        raise EngineError("no calibration images: pass radiographs or phantom seeds")
    return torch.cat(batches), names


def calibration_digest(images: torch.Tensor, runs=CALIBRATION_RUNS) -> str:
    """The calibration set's digest: with the weights (in the key too) it fixes every (U, t)."""
    digest = hashlib.sha256(images.detach().float().contiguous().numpy().tobytes())
    digest.update(json.dumps([list(run) for run in runs]).encode())
    return digest.hexdigest()[:16]


def calibration_set(model: Model, images: torch.Tensor, runs=CALIBRATION_RUNS) -> list[dict[str, np.ndarray]]:
    """Every (U, t) met while sampling `images` in each run, one batch-1 feed per U-Net input."""
    from .quantize import calibration_feeds

    feeds = []
    for sampler, steps, seed in runs:
        recorded = calibration_feeds(model, images, sampler, steps or _default_steps(sampler), seed)
        feeds += [{"U": recorded["U"][i:i + 1], "t": recorded["t"][i:i + 1]}
                  for i in range(len(recorded["t"]))]
    return feeds


def _default_steps(sampler: str) -> int:
    from ..diffusion.plan import resolve_steps

    return resolve_steps(sampler, None)


# Quantisation --------------------------------------------------------------------------------

def ignored_scope(nncf, ignored: str):
    """NNCF's IgnoredScope for an option name: 'none', 'time-embedding', 'first-conv' (the time
    embedding and the first convolution, which reads x_t and the CXR latent at once) or 'attention'
    (the time embedding and the attention blocks)."""
    if ignored == "none":
        return None
    patterns = list(IGNORED_PATTERNS)
    if ignored == "first-conv":
        patterns.append(r".*/input_blocks\.0/.*")
    elif ignored == "attention":
        patterns += [r".*/(qkv|proj_out)/.*", r".*/MatMul(_1)?$"]
    elif ignored != "time-embedding":
        raise ValueError(f"unknown ignored scope {ignored!r}")
    return nncf.IgnoredScope(patterns=patterns, validate=False)


def quantize_unet(onnx_file: str | Path, feeds: list[dict[str, np.ndarray]],
                  options: dict | None = None):
    """The fp32 ONNX U-Net as an OpenVINO model with int8 weights and activations (NNCF PTQ)."""
    ov, nncf = require_openvino()
    options = {**QUANTIZATION_OPTIONS, **(options or {})}
    model = ov.Core().read_model(str(onnx_file))
    presets = {"performance": nncf.QuantizationPreset.PERFORMANCE, "mixed": nncf.QuantizationPreset.MIXED}
    model_type = nncf.ModelType.TRANSFORMER if options["model_type"] == "transformer" else None
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    ranges = {"mean_minmax": RangeEstimatorParametersSet.MEAN_MINMAX,
              "minmax": RangeEstimatorParametersSet.MINMAX,
              "histogram": RangeEstimatorParametersSet.HISTOGRAM}[options["activations_range"]]
    return nncf.quantize(
        model, nncf.Dataset(feeds), preset=presets[options["preset"]], model_type=model_type,
        subset_size=len(feeds), fast_bias_correction=options["fast_bias_correction"],
        ignored_scope=ignored_scope(nncf, options["ignored"]),
        advanced_parameters=AdvancedQuantizationParameters(activations_range_estimator_params=ranges),
    )


def int8_key(model_dir: str | Path, calibration: str, options: dict | None = None) -> Int8Key:
    ov, nncf = require_openvino()
    options = {**QUANTIZATION_OPTIONS, **(options or {})}
    return Int8Key("unet", model_hash(model_dir), ov.__version__, nncf.__version__, calibration,
                   json.dumps(options, sort_keys=True))


def int8_unet_ir(model_dir: str | Path, model: Model,
                 calibration_images: Sequence[str | Path] | None = None,
                 phantoms: Sequence[int] = PHANTOM_SEEDS, options: dict | None = None,
                 runs: Sequence[tuple[str, int | None, int]] = CALIBRATION_RUNS,
                 force: bool = False) -> Path:
    """`engines/openvino/unet-int8.xml` of a model directory, quantised when missing or stale.

    Stale means its manifest differs from the key of the weights, OpenVINO and NNCF versions, the
    calibration set (images and sampling `runs`) and the options. `calibration_images=None` names
    no calibration set: an IR calibrated on any set is kept (the one the gate measured, typically),
    and a missing or stale one is calibrated on the bundled samples. An IR without a manifest is
    someone else's and is refused.
    """
    from .onnx_export import export_model_dir

    images, names = calibration_units(model, calibration_images, phantoms)
    key = int8_key(model_dir, calibration_digest(images, runs), options)
    path = int8_ir_path(model_dir)
    if path.exists() and not force:
        recorded = read_manifest(path, Int8Key)
        if recorded == key or (recorded is not None and calibration_images is None
                               and replace(recorded, calibration=key.calibration) == key):
            return path
        if recorded is None:
            raise EngineError(f"{path} exists and was not written by bsldm_fast; move it away")
        logger.info("rebuilding %s: %s", path, "; ".join(differences(recorded, key)))
    ov, _ = require_openvino()
    source = export_model_dir(model_dir, "fp32", ("unet",), model=model)[0].path
    feeds = calibration_set(model, images, runs)
    logger.info("quantising %s to int8 on %d U-Net inputs from %d images", source, len(feeds), len(images))
    quantized = quantize_unet(source, feeds, options)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_ir(ov, quantized, path)
    write_manifest(path, key)
    _calibration_note(path).write_text(json.dumps({"images": names, "runs": list(runs),
                                                   "inputs": len(feeds)}, indent=2) + "\n")
    return path


def _calibration_note(path: Path) -> Path:
    return path.with_name(path.stem + "-calibration.json")


def calibration_record(model_dir: str | Path) -> dict | None:
    """Which images and sampling runs the IR was calibrated on, as written beside it."""
    try:
        return json.loads(_calibration_note(int8_ir_path(model_dir)).read_text())
    except (OSError, ValueError):
        return None


def _save_ir(ov, model, path: Path) -> None:
    """Write .xml and .bin so that neither is ever seen half-written: the manifest is removed first
    (an IR without one is never used), the pair is saved in a scratch folder and renamed in."""
    from .cache import manifest_path

    manifest_path(path).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        tmp = Path(scratch) / path.name
        ov.save_model(model, str(tmp), compress_to_fp16=False)
        shutil.move(str(tmp.with_suffix(".bin")), path.with_suffix(".bin"))
        shutil.move(str(tmp), path)


def compile_unet(path: str | Path, precision: str = "bf16"):
    """An OpenVINO IR or ONNX U-Net compiled for the CPU; `precision` is the inference-precision hint
    for the layers that are not int8 ('bf16' or 'f32')."""
    ov, _ = require_openvino()
    core = ov.Core()
    return core.compile_model(core.read_model(str(path)), "CPU",
                              {"INFERENCE_PRECISION_HINT": precision})


# The gate ------------------------------------------------------------------------------------

def write_gate(model_dir: str | Path, verdict: dict) -> Path:
    """Record the gate's verdict beside the IR, with the key of the IR it was measured on."""
    path = gate_path(model_dir)
    key = read_manifest(int8_ir_path(model_dir), Int8Key)
    record = {**verdict, "ir_key": asdict(key) if key is not None else None}
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2) + "\n"))
    return path


def int8_gate(model_dir: str | Path) -> dict | None:
    """The gate's verdict for this model directory's int8 IR, or None when there is none."""
    try:
        record = json.loads(gate_path(model_dir).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def int8_refusal(model_dir: str | Path | None) -> str | None:
    """Why the int8 U-Net cannot run for this model (it runs bf16 instead), or None when it can."""
    if model_dir is None:
        return "the int8 U-Net belongs to a model directory, and this model has none"
    path = int8_ir_path(model_dir)
    key = read_manifest(path, Int8Key)
    if not path.exists() or key is None:
        return f"no int8 U-Net in {path.parent}; build it and run benchmarks/int8_gate.py"
    verdict = int8_gate(model_dir)
    if verdict is None:
        return f"the int8 U-Net of {model_dir} has not been through the quality gate (benchmarks/int8_gate.py)"
    if verdict.get("ir_key") != asdict(key):
        return f"the int8 U-Net of {model_dir} changed since its quality gate; rerun benchmarks/int8_gate.py"
    try:
        if key.model_hash != model_hash(model_dir):
            return f"the int8 U-Net of {model_dir} is stale (the weights or config changed)"
    except OSError as error:
        return f"cannot hash the weights of {model_dir}: {error}"
    if not verdict.get("passed"):
        return (f"the int8 U-Net of {model_dir} failed the quality gate: {verdict.get('reason', '')}"
                .rstrip(": "))
    return None
