"""Int8 networks for the CPU: NNCF post-training quantisation of the fp32 ONNX U-Net, VQ decoder and
VQ encoder to OpenVINO IRs, and the quality gate that decides which of them a model may use.

Calibration is on what each network sees in use, never random tensors. For the U-Net
(`quantize.calibration_feeds`): radiographs (the bundled SZCH samples by default) plus a few
synthetic phantoms are encoded, sampled with the default sampler and with DPM-Solver++, and every
(U, t) the denoiser is called with is recorded: the activation ranges of a diffusion U-Net depend on
t and on real-looking latents. For the encoder: those same images, as the model reads them. For the
decoder: the final sampled latents of those same sampling runs, snapped to the codebook when the
model decodes quantised samples (`diffusion.quantize_sample`), plus the images' own encoder latents
(`vq_calibration_set`).

The encoder IR is the encoder graph cut at the float32 latent (`openvino.split_model`) before it
is quantised: the codebook search is never int8; `kernels.vq_quantize` does it in float32.

Layout in a model directory (beside the TensorRT engines of engines/cache.py), NET one of `NETWORKS`:

    engines/openvino/NET-int8.xml (+ .bin)    the quantised network, float32 I/O as its ONNX graph
                                              (the encoder's output is the latent before the search)
    engines/openvino/NET-int8.xml.json        its manifest (`Int8Key`); any change rebuilds it
    engines/openvino/NET-int8-calibration.json  what it was calibrated on
    engines/openvino/int8-gate.json           the verdict of benchmarks/int8_gate.py, per network

A model runs a network in int8 only when the gate's verdict passed that network for the IR that is
there now (`int8_refusal(model_dir, network)` says why not otherwise, for the runner to log before
it runs that network in bf16).
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
from .cache import EngineError, differences, model_hash, read_manifest, write_manifest
from .openvino import cache_dir

logger = logging.getLogger(__name__)

NETWORKS = ("unet", "decoder", "encoder")
"""The networks that may run int8, in the order the gate adds them (benchmarks/int8_gate.py): the
U-Net first (it runs at every step), then the decoder (its error lands in the image once, unamplified),
then the encoder (a flipped code in the condition steers every step after it)."""
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
"""The U-Net's NNCF options."""
# NOTE: VQ options, measured on the bundled model against fp32 torch on held-out inputs (pair 2's
# CXR and an unseen phantom; for the decoder their DDPM-10 sampled latents, seeds 0-1, snapped to
# the codebook, and their own latents), calibrated as `int8_ir` does (CXRs 0, 1 and phantoms 0-2),
# float layers under the bf16 hint. Encoder, share of latent positions whose code changes (the
# search in float32 on its latent; the bf16 encoder: 0.034): MIXED preset, nothing float 0.136;
# first conv float 0.119; last conv (the one writing the latent) float 0.131; both float 0.112;
# both + PERFORMANCE preset 0.112; both + min-max ranges 0.114; both + histogram ranges 0.107 (but
# latent max error 0.042 vs 0.016); full bias correction: identical. Decoder, PSNR of its image vs
# fp32 (the bf16 decoder: 72.2 dB): nothing float 51.7 dB; first conv float 52.3; last conv (the
# transposed conv writing the image) float 50.5; both 51.0; both + PERFORMANCE 50.4; both + min-max
# 49.6. So the encoder keeps its first and last convolutions float (the image's and the latent's
# ranges are the ones per-tensor int8 spends worst, and the flips are what the gate sees), the
# decoder only its first (keeping the last float measured no better). There is no GroupNorm in
# this VQGAN. Whether the encoder's ~3x more flipped codes than bf16 matter is the gate's call.
ENCODER_OPTIONS = {"preset": "mixed", "model_type": None, "fast_bias_correction": True,
                   "ignored": "first-last-conv", "activations_range": "mean_minmax"}
DECODER_OPTIONS = {"preset": "mixed", "model_type": None, "fast_bias_correction": True,
                   "ignored": "first-conv", "activations_range": "mean_minmax"}
DEFAULT_OPTIONS = {"unet": QUANTIZATION_OPTIONS, "encoder": ENCODER_OPTIONS, "decoder": DECODER_OPTIONS}
CONVOLUTIONS = ("Convolution", "ConvolutionBackpropData", "GroupConvolution")


def require_openvino():
    """(openvino, nncf), or EngineError saying how to get them."""
    try:
        import nncf
        import openvino
    except ImportError as error:
        raise EngineError("the int8 networks need OpenVINO and NNCF: "
                          "pip install 'bsldm-fast[int8]' (openvino and nncf)") from error
    return openvino, nncf


def _check_network(network: str) -> str:
    if network not in NETWORKS:
        raise ValueError(f"unknown network {network!r}; the int8 networks are {NETWORKS}")
    return network


def network_options(network: str, options: dict | None = None) -> dict:
    """The NNCF options of a network: its defaults, overridden by `options`."""
    return {**DEFAULT_OPTIONS[_check_network(network)], **(options or {})}



def int8_ir_path(model_dir: str | Path, network: str = "unet") -> Path:
    return cache_dir(model_dir) / f"{_check_network(network)}-int8.xml"


def gate_path(model_dir: str | Path) -> Path:
    return cache_dir(model_dir) / GATE_FILE


@dataclass(frozen=True)
class Int8Key:
    """What an int8 IR depends on; any change makes it stale."""

    graph: str
    """The network: 'unet', 'decoder' or 'encoder'."""
    model_hash: str
    openvino_version: str
    nncf_version: str
    calibration: str
    """Digest of the calibration images (as fed to the encoder) and of the sampling runs recorded
    (for the encoder, the images alone)."""
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
        names += [_shown(job.source) for job in find_images([str(p) for p in calibration_images])]
    size = model.config.image_size
    for seed in phantoms:
        batches.append(model_input(generate(seed, size).cxr, model.config).tensor)
        names.append(f"phantom:{seed}@{size}")
    if not batches:
        raise EngineError("no calibration images: pass radiographs or phantom seeds")
    return torch.cat(batches), names


def _shown(path) -> str:
    """A calibration image's name for the notes: relative to the source checkout when inside it, so
    that a shipped note names no one's home directory."""
    try:
        return str(Path(path).resolve().relative_to(SAMPLE_RADIOGRAPHS.parents[2]))
    except ValueError:
        return str(path)


def calibration_digest(images: torch.Tensor, runs=CALIBRATION_RUNS) -> str:
    """The calibration set's digest: with the weights (in the key too) it fixes every network input."""
    digest = hashlib.sha256(images.detach().float().contiguous().numpy().tobytes())
    digest.update(json.dumps([list(run) for run in runs]).encode())
    return digest.hexdigest()[:16]


def _network_runs(network: str, runs) -> tuple:
    """The sampling runs a network's calibration depends on: none for the encoder (it reads the images)."""
    return () if network == "encoder" else tuple(runs)


def calibration_set(model: Model, images: torch.Tensor, runs=CALIBRATION_RUNS) -> list[dict[str, np.ndarray]]:
    """Every (U, t) met while sampling `images` in each run, one batch-1 feed per U-Net input."""
    from .quantize import calibration_feeds

    feeds = []
    for sampler, steps, seed in runs:
        recorded = calibration_feeds(model, images, sampler, steps or _default_steps(sampler), seed)
        feeds += [{"U": recorded["U"][i:i + 1], "t": recorded["t"][i:i + 1]}
                  for i in range(len(recorded["t"]))]
    return feeds


def sampled_latents(model: Model, images: torch.Tensor, runs=CALIBRATION_RUNS) -> torch.Tensor:
    """What the decoder is given for `images` in each sampling run (the fp32 torch pipeline, seeds
    `seed + i` as `quantize.calibration_feeds` draws them): the final sampled latents, snapped to the
    codebook when the model decodes quantised samples."""
    from ..pipeline import Pipeline

    pipeline = Pipeline.create(model.config, model.vqgan, model.unet, device="cpu")
    latents = []
    with torch.inference_mode():
        cond = pipeline.encode(images)
        for sampler, steps, seed in runs:
            x = pipeline.sample_latents(cond, [seed + i for i in range(cond.shape[0])], sampler,
                                        steps or _default_steps(sampler))
            latents.append(pipeline.quantize(x) if model.config.diffusion.quantize_sample else x)
    return torch.cat(latents)


def vq_calibration_set(model: Model, images: torch.Tensor, network: str,
                       runs=CALIBRATION_RUNS) -> list[dict[str, np.ndarray]]:
    """Batch-1 feeds of the encoder (the images) or the decoder (the sampled latents of every run,
    `sampled_latents`, then the images' own quantised encoder latents)."""
    if network == "encoder":
        inputs, name = images.float(), "image"
    elif network == "decoder":
        from ..pipeline import Pipeline

        with torch.inference_mode():
            own = Pipeline.create(model.config, model.vqgan, model.unet, device="cpu").encode(images)
        inputs, name = torch.cat([sampled_latents(model, images, runs), own]), "latent"
    else:
        raise ValueError(f"not a VQ network: {network!r}")
    array = inputs.detach().cpu().float().numpy()
    return [{name: array[i:i + 1]} for i in range(len(array))]


def _default_steps(sampler: str) -> int:
    from ..diffusion.plan import resolve_steps

    return resolve_steps(sampler, None)


# Quantisation --------------------------------------------------------------------------------

def ignored_scope(nncf, ignored: str, model=None):
    """NNCF's IgnoredScope for an option name. U-Net: 'none', 'time-embedding', 'first-conv' (the
    time embedding and the first convolution, which reads x_t and the CXR latent at once) or
    'attention' (the time embedding and the attention blocks). VQ encoder/decoder (`model` given):
    'none', 'first-conv' (the convolution reading the input), 'last-conv' (the one writing the
    output) or 'first-last-conv', found by their place in `model`'s graph."""
    if ignored == "none":
        return None
    if model is not None:
        convolutions = [op.get_friendly_name() for op in model.get_ordered_ops()
                        if op.get_type_name() in CONVOLUTIONS]
        names = {"first-conv": convolutions[:1], "last-conv": convolutions[-1:],
                 "first-last-conv": [convolutions[0], convolutions[-1]]}.get(ignored)
        if names is None:
            raise ValueError(f"unknown ignored scope {ignored!r} for a VQ network")
        return nncf.IgnoredScope(names=names, validate=False)
    patterns = list(IGNORED_PATTERNS)
    if ignored == "first-conv":
        patterns.append(r".*/input_blocks\.0/.*")
    elif ignored == "attention":
        patterns += [r".*/(qkv|proj_out)/.*", r".*/MatMul(_1)?$"]
    elif ignored != "time-embedding":
        raise ValueError(f"unknown ignored scope {ignored!r}")
    return nncf.IgnoredScope(patterns=patterns, validate=False)


def _quantize(model, feeds: list[dict[str, np.ndarray]], options: dict, scope):
    _, nncf = require_openvino()
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
        ignored_scope=scope,
        advanced_parameters=AdvancedQuantizationParameters(activations_range_estimator_params=ranges),
    )


def quantize_unet(onnx_file: str | Path, feeds: list[dict[str, np.ndarray]],
                  options: dict | None = None):
    """The fp32 ONNX U-Net as an OpenVINO model with int8 weights and activations (NNCF PTQ)."""
    ov, nncf = require_openvino()
    options = network_options("unet", options)
    model = ov.Core().read_model(str(onnx_file))
    return _quantize(model, feeds, options, ignored_scope(nncf, options["ignored"]))


def quantize_vq(onnx_file: str | Path, network: str, feeds: list[dict[str, np.ndarray]],
                options: dict | None = None):
    """The fp32 ONNX encoder or decoder as an OpenVINO model with int8 weights and activations
    (NNCF PTQ). The encoder is first cut at the float32 latent before the codebook search
    (`openvino.split_model`), so the search is not in the quantised model at all."""
    from .openvino import split_model

    ov, nncf = require_openvino()
    options = network_options(network, options)
    model = ov.Core().read_model(str(onnx_file))
    if network == "encoder":
        model = split_model(model, "encoder")
    elif network != "decoder":
        raise ValueError(f"not a VQ network: {network!r}")
    return _quantize(model, feeds, options, ignored_scope(nncf, options["ignored"], model))


def int8_key(model_dir: str | Path, calibration: str, options: dict | None = None,
             network: str = "unet") -> Int8Key:
    ov, nncf = require_openvino()
    return Int8Key(network, model_hash(model_dir), ov.__version__, nncf.__version__, calibration,
                   json.dumps(network_options(network, options), sort_keys=True))


def int8_unet_ir(model_dir: str | Path, model: Model,
                 calibration_images: Sequence[str | Path] | None = None,
                 phantoms: Sequence[int] = PHANTOM_SEEDS, options: dict | None = None,
                 runs: Sequence[tuple[str, int | None, int]] = CALIBRATION_RUNS,
                 force: bool = False) -> Path:
    """`engines/openvino/unet-int8.xml` of a model directory, quantised when missing or stale
    (`int8_ir`)."""
    return int8_ir(model_dir, model, "unet", calibration_images, phantoms, options, runs, force)


def int8_ir(model_dir: str | Path, model: Model, network: str = "unet",
            calibration_images: Sequence[str | Path] | None = None,
            phantoms: Sequence[int] = PHANTOM_SEEDS, options: dict | None = None,
            runs: Sequence[tuple[str, int | None, int]] = CALIBRATION_RUNS,
            force: bool = False) -> Path:
    """`engines/openvino/<network>-int8.xml` of a model directory, quantised when missing or stale.

    Stale means its manifest differs from the key of the weights, OpenVINO and NNCF versions, the
    calibration set (images and sampling `runs`; the encoder's is the images alone) and the options.
    `calibration_images=None` names no calibration set: an IR calibrated on any set is kept (the one
    the gate measured, typically), and a missing or stale one is calibrated on the bundled samples.
    An IR without a manifest is someone else's and is refused.
    """
    from .onnx_export import export_model_dir

    _check_network(network)
    runs = _network_runs(network, runs)
    images, names = calibration_units(model, calibration_images, phantoms)
    key = int8_key(model_dir, calibration_digest(images, runs), options, network)
    path = int8_ir_path(model_dir, network)
    if path.exists() and not force:
        recorded = read_manifest(path, Int8Key)
        if recorded == key or (recorded is not None and calibration_images is None
                               and replace(recorded, calibration=key.calibration) == key):
            return path
        if recorded is None:
            raise EngineError(f"{path} exists and was not written by bsldm_fast; move it away")
        logger.info("rebuilding %s: %s", path, "; ".join(differences(recorded, key)))
    ov, _ = require_openvino()
    source = export_model_dir(model_dir, "fp32", (network,), model=model)[0].path
    if network == "unet":
        feeds = calibration_set(model, images, runs)
        quantized = quantize_unet(source, feeds, options)
    else:
        feeds = vq_calibration_set(model, images, network, runs)
        quantized = quantize_vq(source, network, feeds, options)
    logger.info("quantised %s to int8 on %d %s inputs from %d images", source, len(feeds), network,
                len(images))
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_ir(ov, quantized, path)
    write_manifest(path, key)
    _calibration_note(path).write_text(json.dumps({"network": network, "images": names,
                                                   "runs": [list(r) for r in runs],
                                                   "inputs": len(feeds)}, indent=2) + "\n")
    return path


def _calibration_note(path: Path) -> Path:
    return path.with_name(path.stem + "-calibration.json")


def calibration_record(model_dir: str | Path, network: str = "unet") -> dict | None:
    """Which images and sampling runs the IR was calibrated on, as written beside it."""
    try:
        return json.loads(_calibration_note(int8_ir_path(model_dir, network)).read_text())
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


def compile_ir(path: str | Path, precision: str = "bf16"):
    """An OpenVINO IR or ONNX network compiled for the CPU as is (no reshape, no cuts);
    `precision` is the inference-precision hint for the layers that are not int8 ('bf16' or 'f32')."""
    ov, _ = require_openvino()
    core = ov.Core()
    return core.compile_model(core.read_model(str(path)), "CPU",
                              {"INFERENCE_PRECISION_HINT": precision})



# The gate ------------------------------------------------------------------------------------

def write_gate(model_dir: str | Path, verdict: dict) -> Path:
    """Record the gate's verdict beside the IRs, with the key of each IR it was measured on.

    `verdict["networks"]` maps each network judged to {"passed": bool, "reason": str, ...}; a
    verdict without it (the U-Net-only format) is the U-Net's, from its "passed" and "reason".
    The record gets "int8_networks" (those that passed) and each network's "ir_key"."""
    networks = _network_verdicts(verdict)
    for network, entry in networks.items():
        key = read_manifest(int8_ir_path(model_dir, network), Int8Key)
        entry["ir_key"] = asdict(key) if key is not None else None
    record = {**verdict, "networks": networks,
              "int8_networks": [n for n in NETWORKS if networks.get(n, {}).get("passed")]}
    if "unet" in networks:  # the U-Net-only format's fields, for readers of it
        record["ir_key"] = networks["unet"]["ir_key"]
    path = gate_path(model_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2) + "\n"))
    return path


def _network_verdicts(record: dict) -> dict[str, dict]:
    networks = record.get("networks")
    if isinstance(networks, dict):
        return {n: dict(v) for n, v in networks.items() if n in NETWORKS and isinstance(v, dict)}
    if "passed" in record:  # the U-Net-only format
        return {"unet": {"passed": bool(record["passed"]), "reason": record.get("reason", ""),
                         **({"ir_key": record["ir_key"]} if "ir_key" in record else {})}}
    return {}


def int8_gate(model_dir: str | Path) -> dict | None:
    """The gate's verdict for this model directory's int8 IRs, or None when there is none."""
    try:
        record = json.loads(gate_path(model_dir).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def int8_refusal(model_dir: str | Path | None, network: str = "unet") -> str | None:
    """Why `network` cannot run int8 for this model (it runs bf16 instead), or None when it can:
    the gate's verdict passed it for the IR that is there now, and the weights are the IR's."""
    name = {"unet": "U-Net", "decoder": "VQ decoder", "encoder": "VQ encoder"}[_check_network(network)]
    if model_dir is None:
        return f"the int8 {name} belongs to a model directory, and this model has none"
    path = int8_ir_path(model_dir, network)
    key = read_manifest(path, Int8Key)
    if not path.exists() or key is None:
        return f"no int8 {name} in {path.parent}; build it and run benchmarks/int8_gate.py"
    verdict = int8_gate(model_dir)
    entry = _network_verdicts(verdict).get(network) if verdict is not None else None
    if entry is None:
        return f"the int8 {name} of {model_dir} has not been through the quality gate (benchmarks/int8_gate.py)"
    if entry.get("ir_key") != asdict(key):
        return f"the int8 {name} of {model_dir} changed since its quality gate; rerun benchmarks/int8_gate.py"
    try:
        if key.model_hash != model_hash(model_dir):
            return f"the int8 {name} of {model_dir} is stale (the weights or config changed)"
    except OSError as error:
        return f"cannot hash the weights of {model_dir}: {error}"
    if not entry.get("passed"):
        return (f"the int8 {name} of {model_dir} failed the quality gate: {entry.get('reason', '')}"
                .rstrip(": "))
    return None


def int8_networks(model_dir: str | Path | None) -> tuple[str, ...]:
    """The networks this model may run int8 now (`int8_refusal` is None for each)."""
    return tuple(n for n in NETWORKS if int8_refusal(model_dir, n) is None)
