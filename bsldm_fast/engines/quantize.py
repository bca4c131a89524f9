"""FP8/INT8 post-training quantisation of the U-Net graph with NVIDIA ModelOpt, calibrated on images.

The calibration set is what the U-Net sees in use: the calibration radiographs are encoded, sampled
with the default sampler, and every (U, t) the denoiser is called with is recorded. ModelOpt's ONNX
PTQ (`modelopt.onnx.quantization.quantize`) then inserts Q/DQ nodes into the float32 graph and
casts the rest to fp16, for a strongly typed TensorRT build. Without ModelOpt the request is refused.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .._files import atomic_write
from ..config import ModelConfig
from ..modeldir import Model
from .cache import EngineError, OnnxKey, read_manifest, write_manifest

logger = logging.getLogger(__name__)

MODELOPT_HINT = (
    "{mode} engines need post-training quantisation with NVIDIA ModelOpt, which is not installed: "
    "pip install 'nvidia-modelopt[onnx]', or build --precision fp16 or bf16"
)


def modelopt_quantize():
    """`modelopt.onnx.quantization.quantize`, or EngineError saying how to get it."""
    try:
        from modelopt.onnx.quantization import quantize
    except ImportError as error:
        raise EngineError(MODELOPT_HINT.format(mode="fp8/int8")) from error
    return quantize


def load_calibration_images(paths: Sequence[str | Path], config: ModelConfig) -> torch.Tensor:
    """Radiographs (files or folders) as a [N, 1, S, S] batch exactly as inference feeds the
    pipeline (`preprocess.model_input`: resized, normalised, in [-1, 1])."""
    from ..io import ImageError, find_images
    from ..preprocess import model_input, read_radiograph

    try:
        units = [read_radiograph(job.source).unit for job in find_images([str(p) for p in paths])]
    except ImageError as error:
        raise EngineError(f"calibration images: {error}") from error
    if not units:
        raise EngineError("no calibration images found; pass --calibration-images with radiographs")
    return torch.cat([model_input(unit, config).tensor for unit in units])


@torch.inference_mode()
def calibration_feeds(model: Model, images: torch.Tensor, sampler: str = "dpmpp",
                      steps: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """Every U-Net input (U, t) met while sampling soft-tissue latents for `images`, as arrays."""
    from ..pipeline import Pipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipeline = Pipeline.create(model.config, model.vqgan, model.unet, device=device)
    recording = _Recording(pipeline.runner)
    cond = pipeline.encode(images)
    seeds = [seed + i for i in range(cond.shape[0])]
    Pipeline(model.config, recording, device).sample_latents(cond, seeds, sampler, steps)
    return {"U": torch.cat([u for u, _ in recording.inputs]).cpu().numpy(),
            "t": torch.cat([t for _, t in recording.inputs]).to(torch.int64).cpu().numpy()}


class _Recording:
    """A runner that keeps a copy of every U-Net input it is given."""

    def __init__(self, runner):
        self.runner = runner
        self.name, self.precision, self.codes = runner.name, runner.precision, runner.codes
        self.inputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.runner.encode(images)

    def denoise(self, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.inputs.append((u.clone(), t.clone()))
        return self.runner.denoise(u, t)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.runner.decode(latents)


def quantized_unet_onnx(model_dir: str | Path, model: Model, mode: str,
                        calibration_images: Sequence[str | Path]) -> tuple[Path, bool]:
    """(path, written now) of `onnx/unet-<mode>.onnx`, quantised from the fp32 graph.

    Kept when its manifest matches the weights and the calibration set; re-made otherwise.
    """
    from .onnx_export import DEFAULT_OPSET, export_model_dir, onnx_key, onnx_path

    if mode not in ("fp8", "int8"):
        raise ValueError(f"quantisation mode must be fp8 or int8, got {mode!r}")
    if not calibration_images:
        raise EngineError(f"{mode} needs calibration radiographs: pass --calibration-images DIR")
    quantize = modelopt_quantize()
    images = load_calibration_images(calibration_images, model.config)
    feeds = calibration_feeds(model, images)
    digest = hashlib.sha256(feeds["U"].tobytes() + feeds["t"].tobytes()).hexdigest()[:16]
    path = onnx_path(model_dir, "unet", mode)
    base = onnx_key(model_dir, "unet", mode, DEFAULT_OPSET)
    key = OnnxKey(base.graph, base.precision, base.model_hash, base.opset,
                  f"{base.exporter}, modelopt {mode} calibrated on {digest}")
    if path.exists():
        recorded = read_manifest(path, OnnxKey)
        if recorded == key:
            return path, False
        if recorded is None:
            raise EngineError(f"{path} exists and was not written by bsldm_fast; move it away")
    source = export_model_dir(model_dir, "fp32", ("unet",), model=model)[0].path
    logger.info("quantising %s to %s on %d calibration inputs", source, mode, len(feeds["t"]))

    def write(tmp: str) -> None:
        # ModelOpt names its intermediate files after the output, so it writes a plain .onnx name
        # in a scratch folder beside the target; atomic_write then renames it into place.
        with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
            out = Path(scratch) / path.name
            quantize(
                onnx_path=str(source), quantize_mode=mode, calibration_data=feeds,
                calibration_method="max",
                calibration_eps=["cuda:0"] if torch.cuda.is_available() else ["cpu"],
                output_path=str(out), high_precision_dtype="fp16",
                # GroupNorm stays float32, as in the fp16 graphs.
                op_types_to_exclude_fp16=["InstanceNormalization"],
            )
            os.replace(out, tmp)

    atomic_write(path, write)
    write_manifest(path, key)
    return path, True
