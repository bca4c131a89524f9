"""Training sees exactly the pixels inference feeds the networks, for DICOM as for PNG: the same
reader (Modality/VOI LUT, MONOCHROME1 inverted), the same resize, the same [-1, 1] map."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bsldm_fast import Suppressor, preprocess
from bsldm_fast.io import read_image
from bsldm_fast.modeldir import random_model
from bsldm_fast.training import distributed
from bsldm_fast.training.data import ShardSampler
from bsldm_fast.training.trainer import _datasets, _loader, build, model_config_for
from dicom_factory import make_dicom
from train_helpers import tiny_config

CPU = distributed.Context(0, 1, 0, torch.device("cpu"))


def _dicom_pairs(root: Path, count: int = 2) -> Path:
    """root/CXR/<i>.dcm and root/BS/<i>.dcm: 12-bit MONOCHROME1 with a rescale and a window, at
    96 x 80 px (shrunk to the tiny model's 64 px), so every step of the display mapping matters."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:96, 0:80]
    for i in range(count):
        base = 600 + 8 * yy + 5 * xx + rng.integers(0, 200, (96, 80))
        ribs = 400 * (np.sin(yy / 5.0 + i) > 0.6)
        for kind, stored in (("CXR", base + ribs), ("BS", base)):
            (root / kind).mkdir(parents=True, exist_ok=True)
            make_dicom(root / kind / f"{i:03d}.dcm", stored.astype(np.uint16),
                       photometric="MONOCHROME1", bits_stored=12, RescaleSlope=2,
                       RescaleIntercept=-1000, WindowCenter=1200, WindowWidth=2400)
    return root


def test_training_on_dicom_sees_what_inference_feeds(tmp_path, tiny_vqgan_dir):
    data = _dicom_pairs(tmp_path / "data")
    config = tiny_config("ldm", data, tmp_path / "run", vqgan=str(tiny_vqgan_dir), val_fraction=0.0)
    model_config, vqgan = model_config_for(config)
    stage = build(config, CPU, steps_per_epoch=1, model_config=model_config, vqgan=vqgan)
    train, _, _ = _datasets(config, model_config.image_size, CPU, tmp_path / "run")
    loader = _loader(train, ShardSampler(len(train), 0, 1, config.seed, shuffle=False), config, CPU, 0)
    batch = next(iter(loader))

    # One training step; the VQGAN's encoder is the first network to see the CXR.
    seen = []
    hook = stage.vqgan.encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    stage.train_step(batch, epoch=0)
    hook.remove()
    trained_on = seen[0][: len(batch[0])]  # the CXR half, when CXR and BS are encoded together
    assert trained_on.shape == (2, 1, 64, 64) and torch.equal(trained_on, batch[0])

    # Inference on the same files, through the file API: record what reaches the pipeline.
    suppressor = Suppressor(random_model(model_config), device="cpu", sampler="ddim", steps=1)
    assert suppressor.config.input_normalization == model_config.input_normalization
    fed = []

    def recording(images, *args, **kwargs):
        fed.append(images.clone())
        return torch.zeros_like(images)

    suppressor.pipeline.run = recording
    for i in range(2):
        suppressor.suppress_file(data / "CXR" / f"{i:03d}.dcm", tmp_path / "out" / f"{i}.dcm")
    assert torch.equal(trained_on, torch.cat(fed))

    # And it is the DICOM display mapping, not the stored values scaled by their type.
    stored = torch.from_numpy(read_image(data / "CXR" / "000.dcm").astype(np.float32) / 4095.0)
    raw = preprocess.to_model_range(preprocess.resize(stored[None, None], 64))
    assert not torch.allclose(raw, trained_on[:1], atol=0.1)
    # MONOCHROME1: the highest stored values (bottom right) display darkest.
    assert trained_on[0, 0, -4:, -4:].mean() < trained_on[0, 0, :4, :4].mean()
