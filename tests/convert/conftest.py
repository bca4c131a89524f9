"""The original third-party networks at small sizes, with random non-zero weights, saved whole.

They are test-only references (scripts/test.sh installs them): monai-generative's VQVAE and
guided-diffusion's UNetModel (PyPI guided-diffusion-sdk). BS-LDM pickled its U-Net from a vendored
copy of guided-diffusion at `modules/`; `vendored_modules` recreates that layout.
"""

from __future__ import annotations

import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch

VQVAE_KW = dict(
    spatial_dims=2, in_channels=1, out_channels=1, num_channels=(16, 32, 32),
    num_res_channels=(16, 24, 32), num_res_layers=1,
    downsample_parameters=((2, 4, 1, 1),) * 3, upsample_parameters=((2, 4, 1, 1, 0),) * 3,
    num_embeddings=32, embedding_dim=4,
)
"""A three-stage VQVAE like the paper's (1 -> 4 channels, 8x smaller), narrower."""

UNET_KW = dict(
    image_size=8, in_channels=8, model_channels=32, out_channels=8, num_res_blocks=2,
    attention_resolutions=(2, 4), channel_mult=(1, 2, 2), num_heads=2, resblock_updown=True,
    use_scale_shift_norm=True,
)
"""The paper's U-Net layout (legacy attention, residual up/down, scale-shift norm), smaller."""

UNET_VARIANT_KW = dict(
    image_size=8, in_channels=8, model_channels=32, out_channels=4, num_res_blocks=1,
    attention_resolutions=(1, 4), channel_mult=(1, 1, 2), num_head_channels=16,
    resblock_updown=False, use_scale_shift_norm=False, use_new_attention_order=True,
)
"""The other branches: conv up/down, additive timestep embedding, new attention order, head width."""


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random and non-zero (guided-diffusion zero-initialises its output layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif "norm" in name or ".in_layers.0." in name or ".out_layers.0." in name or name.startswith("out.0."):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return module.eval()


def _quiet_import(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return __import__(name, fromlist=["_"])


def make_vqvae(seed: int = 0) -> torch.nn.Module:
    nets = pytest.importorskip("generative.networks.nets")
    vqvae = randomize(nets.VQVAE(**VQVAE_KW), seed)
    with torch.no_grad():  # EMA buffers as after training: the weights they average
        q = vqvae.quantizer.quantizer
        q.ema_w.copy_(q.embedding.weight)
        q.ema_cluster_size.uniform_(0.5, 2.0)
    return vqvae


def make_unet(seed: int = 0, package: str = "guided_diffusion", **overrides) -> torch.nn.Module:
    if package == "guided_diffusion":
        pytest.importorskip("guided_diffusion")
    unet = _quiet_import(f"{package}.unet")
    return randomize(unet.UNetModel(**{**UNET_KW, **overrides}), seed)


@pytest.fixture
def vendored_modules(tmp_path_factory):
    """guided-diffusion copied to an importable `modules/` package, as in the BS-LDM repository;
    removed from sys.modules and sys.path afterwards."""
    gd = pytest.importorskip("guided_diffusion")
    root = tmp_path_factory.mktemp("bsldm_repo")
    package = root / "modules"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("unet.py", "nn.py", "fp16_util.py", "logger.py"):
        shutil.copy(Path(gd.__file__).parent / name, package / name)
    sys.path.insert(0, str(root))
    try:
        yield "modules"
    finally:
        sys.path.remove(str(root))
        for key in [k for k in sys.modules if k == "modules" or k.startswith("modules.")]:
            del sys.modules[key]


def rel_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |ours - theirs| / max |theirs|."""
    return float((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max())


@pytest.fixture(scope="session")
def originals(tmp_path_factory):
    """(U-Net, VQVAE, folder): the originals, saved whole as LDM.pth and VQGAN.pth in folder."""
    root = tmp_path_factory.mktemp("originals")
    unet, vqvae = make_unet(seed=2), make_vqvae(seed=1)
    torch.save(unet, root / "LDM.pth")
    torch.save(vqvae, root / "VQGAN.pth")
    return unet, vqvae, root


@pytest.fixture(scope="session")
def converted(originals):
    """Our model, converted from the saved originals."""
    from bsldm_fast.convert import load_checkpoints

    return load_checkpoints(originals[2] / "LDM.pth", originals[2] / "VQGAN.pth")
