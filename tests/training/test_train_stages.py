"""The two stages on tiny synthetic pairs: losses fall, the LDM's noising is the paper's."""

from __future__ import annotations

import pytest
import torch

from bsldm_fast.config import preset
from bsldm_fast.training import distributed
from bsldm_fast.training.data import PairedDataset, SingleImages, paired_names
from bsldm_fast.training.stages import TRAIN_NOISE_STREAM, LDMStage
from bsldm_fast.training.trainer import build, model_config_for
from train_helpers import tiny_config

CPU = distributed.Context(0, 1, 0, torch.device("cpu"))


def _stage(config):
    model_config, vqgan = model_config_for(config)
    return build(config, CPU, steps_per_epoch=10, model_config=model_config, vqgan=vqgan)


def _batch(pairs, n: int):
    ds = PairedDataset(pairs, paired_names(pairs)[:n], size=64)
    items = [ds[i] for i in range(n)]
    return (torch.stack([c for c, _, _ in items]), torch.stack([b for _, b, _ in items]),
            torch.tensor([i for _, _, i in items]))


def test_vqgan_loss_falls(pairs, tmp_path):
    # The tiny architecture at 32 px keeps the VGG perceptual term cheap.
    model_file = tmp_path / "tiny32.json"
    model_file.write_text(preset("tiny").replace(image_size=32).to_json())
    stage = _stage(tiny_config("vqgan", pairs, tmp_path / "run", lr=2e-3, model=str(model_file)))
    single = SingleImages(PairedDataset(pairs, paired_names(pairs)[:2], size=32))
    batch = (torch.stack([single[i][0] for i in range(4)]), torch.arange(4))
    before = stage.val_loss(batch)["recons_loss"]
    for _ in range(8):
        parts = stage.train_step(batch, epoch=0)
        stage.optimizer_step()
    after = stage.val_loss(batch)["recons_loss"]
    assert after < 0.9 * before, (before, after)
    assert parts["perceptual_loss"] > 0 and parts["disc_loss"] > 0 and parts["quant_loss"] > 0


def test_ldm_loss_falls(pairs, tmp_path, tiny_vqgan_dir):
    stage = _stage(tiny_config("ldm", pairs, tmp_path / "run", vqgan=str(tiny_vqgan_dir), lr=2e-3))
    batch = _batch(pairs, 4)
    before = stage.val_loss(batch, unet=stage.unet)["loss"]  # fixed noise: comparable values
    for _ in range(8):
        stage.train_step(batch, epoch=0)
        stage.optimizer_step()
    after = stage.val_loss(batch, unet=stage.unet)["loss"]
    assert after < 0.9 * before, (before, after)


@pytest.mark.parametrize("scaling", ["none", "original"])
def test_ldm_input_is_what_the_sampler_feeds(pairs, tmp_path, tiny_vqgan_dir, scaling):
    """x_t = sqrt(a) x0 + sqrt(1 - a) eps on the soft-tissue half; the CXR half is the latent c,
    scaled by sqrt(a) only with 'original', exactly as the sampler's denoiser builds it."""
    from bsldm_fast.diffusion import Schedule
    from bsldm_fast.models.latent import LatentDenoiser

    config = tiny_config("ldm", pairs, tmp_path / "run", vqgan=str(tiny_vqgan_dir), condition_scaling=scaling)
    stage = _stage(config)
    assert stage.model_config.diffusion.condition_scaling == scaling
    batch = _batch(pairs, 3)
    seen = {}
    stage.model.register_forward_hook(lambda m, args, out: seen.update(u=args[0], t=args[1]))
    stage.train_step(batch, epoch=5)
    c = stage.vqgan.encode_latent(batch[0])
    x0 = stage.vqgan.encode_latent(batch[1])
    t, eps = stage._draws(batch[2], tuple(x0.shape[1:]), TRAIN_NOISE_STREAM, 5)
    assert torch.equal(t, seen["t"])
    ab = Schedule.from_config(stage.model_config.diffusion).alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0.double() + (1 - ab).sqrt() * eps.double()
    torch.testing.assert_close(seen["u"][:, :4].double(), x_t, rtol=1e-6, atol=1e-6)
    # The sampler's view of the same state.
    fed = {}

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dtype_probe = torch.nn.Parameter(torch.zeros(()))

        def forward(self, u, tt):
            fed.update(u=u)
            return torch.zeros_like(u)[:, :4]

    LatentDenoiser(Probe(), stage.model_config)(torch.cat([seen["u"][:, :4], c], dim=1), t)
    # One conditioning function (diffusion.conditioning) for both: the same tensor, bit for bit.
    assert torch.equal(seen["u"][:, 4:], fed["u"][:, 4:])
    assert torch.equal(seen["u"][:, 4:], c) == (scaling == "none")


def test_offset_noise_is_per_sample_and_channel(pairs, tmp_path, tiny_vqgan_dir):
    on = _stage(tiny_config("ldm", pairs, tmp_path / "a", vqgan=str(tiny_vqgan_dir)))
    off = _stage(tiny_config("ldm", pairs, tmp_path / "b", vqgan=str(tiny_vqgan_dir), offset_noise=False))
    assert isinstance(on, LDMStage) and on.offset == 0.1 and off.offset == 0.0
    idx = torch.arange(64)
    t1, e1 = on._draws(idx, (4, 8, 8), 2, 0)
    t0, e0 = off._draws(idx, (4, 8, 8), 2, 0)
    assert torch.equal(t1, t0)
    shift = e1 - e0  # 0.1 * eps_c, constant over space
    torch.testing.assert_close(shift, shift[:, :, :1, :1].expand_as(shift), rtol=0, atol=1e-6)
    assert 0.07 < float(shift[:, :, 0, 0].std() / 0.1) * 0.1 < 0.13
    # The same sample gets the same draws whatever else is in the batch (DDP and resume rely on it).
    t2, e2 = on._draws(idx[5:7], (4, 8, 8), 2, 0)
    assert torch.equal(e2, e1[5:7]) and torch.equal(t2, t1[5:7])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_run(pairs, tmp_path, tiny_vqgan_dir, precision):
    stage = _stage(tiny_config("ldm", pairs, tmp_path / "run", vqgan=str(tiny_vqgan_dir), precision=precision))
    before = [p.detach().clone() for p in stage.unet.parameters()]
    loss = stage.train_step(_batch(pairs, 2), epoch=0)["loss"]
    stage.optimizer_step()
    assert torch.isfinite(torch.tensor(loss))
    assert all(p.dtype == torch.float32 for p in stage.unet.parameters())  # master weights stay fp32
    assert any(not torch.equal(a, p) for a, p in zip(before, stage.unet.parameters()))
    assert stage.scaler.is_enabled() == (precision == "fp16")


def test_gradient_accumulation_equals_the_whole_batch(pairs, tmp_path, tiny_vqgan_dir):
    from train_helpers import perturb

    stage = _stage(tiny_config("ldm", pairs, tmp_path / "run", vqgan=str(tiny_vqgan_dir)))
    perturb(stage.unet, stage.model_config)
    cxr, bs, idx = _batch(pairs, 4)
    stage.train_step((cxr, bs, idx), epoch=1)
    whole = [p.grad.clone() for p in stage.unet.parameters()]
    stage.opt.zero_grad(set_to_none=True)
    for part in (slice(0, 2), slice(2, 4)):
        stage.train_step((cxr[part], bs[part], idx[part]), epoch=1, sync=part.start == 2, scale=0.5)
    for g, p in zip(whole, stage.unet.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-7)


def test_channels_last_ldm_gives_the_same_loss_and_gradients(pairs, tmp_path, tiny_vqgan_dir):
    """--channels-last only changes the memory layout: same loss and U-Net gradients (fp32 rounding)."""
    batch = _batch(pairs, 2)
    results = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        stage = _stage(tiny_config("ldm", pairs, tmp_path / f"run{channels_last}", vqgan=str(tiny_vqgan_dir),
                                   channels_last=channels_last))
        loss = stage._loss(stage.model, batch, (TRAIN_NOISE_STREAM, 0))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in stage.unet.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-4, atol=1e-6)
    assert any(g.abs().max() > 0 for g in grads_a)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b.contiguous(), a, rtol=1e-3, atol=1e-5)
