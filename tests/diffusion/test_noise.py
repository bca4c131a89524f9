import torch

from bsldm_fast.diffusion.noise import StepNoise, initial_latent, normal


def test_noise_is_a_pure_function_of_seed_stream_and_step():
    a = normal([5, 6], 1, 3, (4, 7, 7))
    assert torch.equal(a, normal([5, 6], 1, 3, (4, 7, 7)))
    assert not torch.equal(a, normal([5, 6], 1, 4, (4, 7, 7)))
    assert not torch.equal(a, normal([5, 6], 0, 3, (4, 7, 7)))
    # Each sample's draw depends on its own seed only, not on its batch.
    assert torch.equal(a[1], normal([6], 1, 3, (4, 7, 7))[0])
    assert torch.equal(StepNoise([5, 6], (4, 7, 7), "cpu")(3), a)


def test_noise_is_standard_normal():
    x = normal(list(range(8)), 1, 0, (4, 64, 64))
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1) < 0.01


def test_offset_noise_adds_one_value_per_sample_and_channel():
    plain = initial_latent([1, 2, 3], (4, 16, 16))
    offset = initial_latent([1, 2, 3], (4, 16, 16), offset_coefficient=0.1)
    shift = offset - plain
    # Constant over space, varying over samples and channels, with the coefficient's scale.
    assert torch.allclose(shift, shift[..., :1, :1].expand_as(shift), atol=1e-6)
    per_channel = shift[:, :, 0, 0]
    assert per_channel.unique().numel() == 12
    assert 0.01 < per_channel.abs().max().item() < 0.5
