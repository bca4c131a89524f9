import pytest
import torch

from bsldm_fast.config import DiffusionConfig
from bsldm_fast.diffusion import Schedule
from bsldm_fast.pipeline import LatentDenoiser, Pipeline


class Recorder(torch.nn.Module):
    """A stand-in U-Net that records its input and returns 8 channels."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, u, t):
        self.seen.append(u.clone())
        return torch.cat([u, -u], dim=1)[:, :8]


@pytest.mark.parametrize("scaling", ["none", "original"])
def test_condition_scaling(tiny_model, scaling, gen):
    config = tiny_model.config.replace(diffusion=DiffusionConfig(condition_scaling=scaling))
    schedule = Schedule.from_config(config.diffusion)
    unet = Recorder()
    denoiser = LatentDenoiser(unet, config, schedule, torch.float32)
    u = torch.randn(2, 8, 4, 4, generator=gen)
    t = torch.tensor([10, 900])
    eps = denoiser(u, t)
    assert eps.shape == (2, 4, 4, 4)
    seen = unet.seen[0]
    assert torch.equal(seen[:, :4], u[:, :4])
    scale = schedule.alphas_cumprod[t].sqrt().float().view(-1, 1, 1, 1) if scaling == "original" else 1.0
    torch.testing.assert_close(seen[:, 4:], u[:, 4:] * scale)


def test_pipeline_checks_the_image_size(tiny_model):
    pipeline = Pipeline(tiny_model.config, tiny_model.vqgan, tiny_model.unet)
    with pytest.raises(ValueError, match="1, 64, 64"):
        pipeline.run(torch.zeros(1, 1, 32, 32), [0])
    with pytest.raises(ValueError, match="seeds"):
        pipeline.sample_latents(torch.zeros(2, 4, 8, 8), [0])


def test_pipeline_output_and_offset_noise(tiny_model, gen):
    pipeline = Pipeline(tiny_model.config, tiny_model.vqgan, tiny_model.unet)
    images = torch.rand(2, 1, 64, 64, generator=gen) * 2 - 1
    plain = pipeline.run(images, [1, 2], "ddim", 3)
    offset = pipeline.run(images, [1, 2], "ddim", 3, offset_noise=True)
    assert plain.shape == images.shape
    assert not torch.equal(plain, offset)
