import pytest
import torch

from bsldm_fast.config import PRESETS, preset
from bsldm_fast.models import VQGAN, UNet


def _shapes(config, device):
    with torch.device(device):
        vqgan, unet = VQGAN(config.vqgan), UNet(config.unet)
        images = torch.randn(2, 1, config.image_size, config.image_size)
        latent = vqgan.encode(images)
        decoded = vqgan.decode(latent)
        u = torch.randn(2, config.unet.in_channels, config.latent_size, config.latent_size)
        eps = unet(u, torch.tensor([0, 999]))
    return latent.shape, decoded.shape, eps.shape


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_output_shapes(name):
    config = preset(name)
    # The paper model (383 M parameters at 1024^2) is traced on the meta device: shapes, no compute.
    device = "meta" if name == "paper" else "cpu"
    latent, decoded, eps = _shapes(config, device)
    s = config.latent_size
    assert tuple(latent) == (2, config.vqgan.embedding_dim, s, s)
    assert tuple(decoded) == (2, 1, config.image_size, config.image_size)
    assert tuple(eps) == (2, config.unet.out_channels, s, s)


def test_paper_latent_is_4x128x128():
    assert preset("paper").latent_size == 128


def test_quantised_latent_holds_codebook_entries(tiny_model, gen):
    vqgan = tiny_model.vqgan
    images = torch.rand(2, 1, 64, 64, generator=gen) * 2 - 1
    with torch.no_grad():
        latent = vqgan.encode_latent(images)
        z = vqgan.encode(images)
    codes = vqgan.quantizer.embedding.weight
    vectors = latent.permute(0, 2, 3, 1).reshape(-1, codes.shape[1])
    # Every vector is a code, and the nearest code to the encoder output (brute force in float64).
    distances = torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, codes.shape[1]).double(), codes.double())
    assert torch.equal(vectors, codes[distances.argmin(dim=1)])


def test_attention_matches_guided_diffusion_legacy_einsum(gen):
    """SDPA attention against guided-diffusion's QKVAttentionLegacy, written out in float64."""
    from bsldm_fast.models.unet import AttentionBlock

    block = AttentionBlock(64, num_heads=4).double()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.2)
    x = torch.randn(2, 64, 5, 7, generator=gen, dtype=torch.float64)
    b, c, length, heads = 2, 64, 35, 4
    qkv = block.qkv(block.norm(x.reshape(b, c, -1)))
    ch = c // heads
    q, k, v = qkv.reshape(b * heads, 3 * ch, length).split(ch, dim=1)
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / ch**0.5, dim=-1)
    h = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, length)
    expected = (x.reshape(b, c, -1) + block.proj_out(h)).reshape(x.shape)
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, rtol=1e-10, atol=1e-12)
