"""`Suppressor`: the Python API. NumPy radiographs in, soft-tissue radiographs out.

Pixels go to the networks and back through `preprocess` (intensity mapping, resizing to the
model's resolution and back, the model's input normalisation and output anchor), the same functions
training, calibration and the metrics use.
Files and folders (DICOM, PNG, JPEG, TIFF) go through `suppress_file` / `suppress_dir`, which share
`io.batch` with the command line.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch

from . import modeldir, preprocess
from .io.batch import BatchOptions, BatchResult, Outcome, run_batch, suppress_file
from .io.dicom import Provenance
from .diffusion.plan import DEFAULT_SAMPLER, resolve_steps
from .precision import dtype_of

logger = logging.getLogger(__name__)

ImageInput = Union[np.ndarray, Sequence[np.ndarray]]

__all__ = ["Suppressor", "resolve_device"]


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' -> CUDA when available, else the CPU; anything else is checked to exist."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but torch sees no CUDA device")
    return device


class Suppressor:
    """Bone suppression of chest radiographs with a BS-LDM model.

    >>> s = Suppressor.from_pretrained("path/to/model")      # doctest: +SKIP
    >>> soft = s(cxr)            # 2-D uint8/uint16/float array -> same shape and dtype

    `backend` picks what runs the networks (engines/runners.py): 'tensorrt' (cached engines,
    `bsldm-fast build-engine`; CUDA), 'torch-compile', 'torch' or 'openvino' (CPU). 'auto' takes,
    on CUDA, TensorRT when it and the engines are there, else torch-compile; on the CPU, each
    network's fastest checked runner from the table `bsldm-fast tune` measured on this CPU, else
    torch. On CUDA the first batch compiles (torch-compile: minutes for the paper model) and
    captures a CUDA graph, which later batches replay; a smaller last batch is padded into it.
    """

    def __init__(self, model: modeldir.Model, device: str | torch.device = "auto",
                 sampler: str = DEFAULT_SAMPLER, steps: int | None = None, seed: int = 0,
                 precision: str = "fp32", batch_size: int = 4, offset_noise: bool = False,
                 backend: str = "auto"):
        if precision != "int8":  # int8's backend and device are build_pipeline's to check
            dtype_of(precision)  # refuses an unknown precision before anything loads
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.config = model.config
        self.source = model.source
        """Where the model came from: its directory, or 'random:<config>' for an untrained one."""
        self.is_random = model.is_random
        self.sampler = sampler
        self.steps = resolve_steps(sampler, steps)  # refuses an unknown sampler
        if not 1 <= self.steps <= self.config.diffusion.num_train_timesteps:
            raise ValueError(
                f"steps must be in [1, {self.config.diffusion.num_train_timesteps}], got {self.steps}"
            )
        self.seed = int(seed)
        self.batch_size = batch_size
        self.offset_noise = offset_noise
        from .pipeline import build_pipeline

        self.pipeline, self.backend = build_pipeline(
            model.config, model.vqgan, model.unet, resolve_device(device), precision, backend,
            model_dir=None if model.is_random else model.source)
        """What runs the networks ('auto' resolved): 'tensorrt', 'torch-compile', 'torch',
        'openvino', or per network ('encoder=openvino,unet=torch,decoder=openvino')."""

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str | torch.device = "auto",
                        sampler: str = DEFAULT_SAMPLER, steps: int | None = None, seed: int = 0,
                        precision: str = "fp32", batch_size: int = 4,
                        offset_noise: bool = False, backend: str = "auto") -> "Suppressor":
        """Load a model directory (or 'random:<config>', an untrained model for demos)."""
        return cls(modeldir.resolve(model_dir), device, sampler, steps, seed, precision,
                   batch_size, offset_noise, backend)

    @property
    def device(self) -> torch.device:
        return self.pipeline.device

    def __call__(self, images: ImageInput, progress=None) -> ImageInput:
        """Soft-tissue image(s) for 2-D array(s): a 2-D array, a list of them, or an [N, H, W] stack.

        The result has the input's container, shapes and dtypes. Every image gets `seed`, so its
        result does not depend on what else is in the batch.
        """
        if isinstance(images, np.ndarray):
            if images.ndim == 2:
                return self._run([images], progress)[0]
            if images.ndim == 3:
                return np.stack(self._run(list(images), progress))
            raise ValueError(f"expected a 2-D image or an [N, H, W] stack, got shape {images.shape}")
        images = list(images)
        for i, image in enumerate(images):
            if not isinstance(image, np.ndarray) or image.ndim != 2:
                raise ValueError(f"image {i}: expected a 2-D numpy array")
        return self._run(images, progress)

    def _run(self, images: list[np.ndarray], progress=None) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for start in range(0, len(images), self.batch_size):
            out.extend(self._run_batch(images[start : start + self.batch_size]))
            if progress is not None:
                progress(len(out))
        return out

    def suppress_unit(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Soft-tissue images for display-space images (float in [0, 1], dense = bright), each at
        its own size; results are float32 in [0, 1]. What the file layer calls."""
        out: list[np.ndarray] = []
        for start in range(0, len(images), self.batch_size):
            out.extend(self._unit_batch(list(images[start : start + self.batch_size])))
        return out

    def _unit_batch(self, units: list[np.ndarray]) -> list[np.ndarray]:
        inputs = [preprocess.model_input(unit, self.config) for unit in units]
        batch = torch.cat([prepared.tensor for prepared in inputs]).to(self.device)
        soft = self.pipeline.run(batch, [self.seed] * len(units), self.sampler, self.steps,
                                 self.offset_noise)
        return preprocess.model_outputs(soft, inputs, self.config)

    def _run_batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        for image in images:
            if min(image.shape) < 2:
                raise ValueError(f"image of shape {image.shape} is too small")
        mapped = [preprocess.pixels_to_unit(image) for image in images]
        softs = self._unit_batch([unit for unit, _ in mapped])
        return [preprocess.unit_to_pixels(soft, value_range, image.dtype)
                for soft, (_, value_range), image in zip(softs, mapped, images)]

    # Files -----------------------------------------------------------------------------------

    def provenance(self) -> Provenance:
        """What made the results: written into derived DICOM instances and batch reports."""
        from . import __version__

        return Provenance(model=self.source, sampler=self.sampler, steps=self.steps, seed=self.seed,
                          version=__version__, untrained=self.is_random, name=self.config.name)

    def suppress_file(self, source: str | Path, target: str | Path, *, overwrite: bool = False,
                      bone: bool = False, side_by_side: bool = False) -> Outcome:
        """Suppress one radiograph file (PNG, JPEG, TIFF or DICOM) into `target`, like `bsldm-fast
        suppress`: same format, bit depth, size and orientation; DICOM as a derived instance;
        atomic; never over an input, nor over an existing file unless `overwrite`. Extra outputs go
        beside `target`. Raises `ImageError` naming the file and the reason."""
        options = BatchOptions(overwrite=overwrite, bone=bone, side_by_side=side_by_side,
                               progress=False)
        return suppress_file(self.suppress_unit, self.provenance(), source, target, options)

    def suppress_dir(self, inputs: str | Path | Sequence[str | Path], output: str | Path, *,
                     overwrite: bool = False, skip_existing: bool = False, bone: bool = False,
                     side_by_side: bool = False, progress: bool = True,
                     report: str | Path | None = None) -> BatchResult:
        """Suppress every radiograph under `inputs` (folders, searched recursively, or files) into
        `output`, keeping relative paths, exactly as `bsldm-fast suppress` does: failures are
        reported and skipped, and a JSON report is written (default OUTPUT/bsldm_fast_report.json).
        Check `result.ok`; `result.failed` lists what failed and why."""
        if isinstance(inputs, (str, Path)):
            inputs = [inputs]
        options = BatchOptions(overwrite=overwrite, skip_existing=skip_existing, bone=bone,
                               side_by_side=side_by_side, progress=progress, report=report)
        return run_batch(self.suppress_unit, self.provenance(), list(inputs), output, options,
                         self.batch_size)
