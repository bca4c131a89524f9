import pytest
import torch

from bsldm_fast.config import DiffusionConfig
from bsldm_fast.diffusion import Schedule
from bsldm_fast.models.latent import LatentDenoiser
from bsldm_fast.pipeline import Pipeline


class Recorder(torch.nn.Module):
    """A stand-in U-Net that records its input and returns 8 channels."""

    def __init__(self):
        super().__init__()
        self.seen = []
        self.dtype_probe = torch.nn.Parameter(torch.zeros(()))  # the wrapper reads the weights' dtype

    def forward(self, u, t):
        self.seen.append(u.clone())
        return torch.cat([u, -u], dim=1)[:, :8]


@pytest.mark.parametrize("scaling", ["none", "original"])
def test_condition_scaling(tiny_model, scaling, gen):
    config = tiny_model.config.replace(diffusion=DiffusionConfig(condition_scaling=scaling))
    schedule = Schedule.from_config(config.diffusion)
    unet = Recorder()
    denoiser = LatentDenoiser(unet, config)
    u = torch.randn(2, 8, 4, 4, generator=gen)
    t = torch.tensor([10, 900])
    eps = denoiser(u, t)
    assert eps.shape == (2, 4, 4, 4)
    seen = unet.seen[0]
    assert torch.equal(seen[:, :4], u[:, :4])
    scale = schedule.alphas_cumprod[t].sqrt().float().view(-1, 1, 1, 1) if scaling == "original" else 1.0
    torch.testing.assert_close(seen[:, 4:], u[:, 4:] * scale)


def test_pipeline_checks_the_image_size(tiny_model):
    pipeline = Pipeline.create(tiny_model.config, tiny_model.vqgan, tiny_model.unet)
    with pytest.raises(ValueError, match="1, 64, 64"):
        pipeline.run(torch.zeros(1, 1, 32, 32), [0])
    with pytest.raises(ValueError, match="seeds"):
        pipeline.sample_latents(torch.zeros(2, 4, 8, 8), [0])


def test_pipeline_output_and_offset_noise(tiny_model, gen):
    pipeline = Pipeline.create(tiny_model.config, tiny_model.vqgan, tiny_model.unet)
    images = torch.rand(2, 1, 64, 64, generator=gen) * 2 - 1
    plain = pipeline.run(images, [1, 2], "ddim", 3)
    offset = pipeline.run(images, [1, 2], "ddim", 3, offset_noise=True)
    assert plain.shape == images.shape
    assert not torch.equal(plain, offset)


def test_bf16_vqgan_matches_fp32(tiny_model, gen):
    """In bf16 the VQGAN's encoder and decoder run in bf16 (channels-last on the CPU), the codebook
    search in float32. Tolerance: bf16 has an 8-bit significand (2^-8 = 0.4 %); through the
    encoder's and decoder's convolutions the measured error is 0.5-0.7 %, bounded here at 3 %, and
    codes may flip only at near-ties (measured 1.6 % of positions, bounded at 10 %)."""
    size = tiny_model.config.image_size
    fp32 = Pipeline.create(tiny_model.config, tiny_model.vqgan, tiny_model.unet, "cpu", "fp32")
    bf16 = Pipeline.create(tiny_model.config, tiny_model.vqgan, tiny_model.unet, "cpu", "bf16")
    images = torch.rand(3, 1, size, size, generator=gen) * 2 - 1
    latents = torch.randn(3, 4, size // 8, size // 8, generator=gen)

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    encoder16 = bf16.runner.modules["encoder"]
    assert next(encoder16.parameters()).dtype == torch.bfloat16
    with torch.inference_mode():
        z32 = fp32.runner.modules["encoder"](images)
        z16 = encoder16(images)
    assert z16.dtype == torch.float32 and rel(z16, z32) <= 3e-2
    codes32, codes16 = fp32.encode(images), bf16.encode(images)
    assert codes16.dtype == torch.float32
    assert float((codes32 == codes16).all(1).float().mean()) >= 0.9
    decoded32, decoded16 = fp32.decode(latents), bf16.decode(latents)
    assert decoded16.dtype == torch.float32 and rel(decoded16, decoded32) <= 3e-2
    assert next(tiny_model.vqgan.parameters()).dtype == torch.float32  # the caller's model is untouched
