"""The VQGAN stage's pieces against monai-generative, which the original trains with."""

from __future__ import annotations

import warnings

import pytest
import torch

from bsldm_fast.config import preset
from bsldm_fast.models import VQGAN
from bsldm_fast.training.discriminator import PatchDiscriminator
from bsldm_fast.training.losses import adversarial_loss, quantize_train

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    generative = pytest.importorskip("generative", reason="monai-generative is the reference")
    from generative.networks.layers.vector_quantizer import EMAQuantizer
    from generative.networks.nets import PatchDiscriminator as MonaiPatchDiscriminator


def _monai_adversarial_loss():
    """monai-generative's PatchAdversarialLoss, loaded from its file: the package's __init__ also
    imports the perceptual loss, which needs `lpips` (not installed here)."""
    import importlib.util
    from pathlib import Path

    path = Path(generative.__file__).parent / "losses" / "adversarial_loss.py"
    spec = importlib.util.spec_from_file_location("_monai_adversarial_loss", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PatchAdversarialLoss


def test_discriminator_matches_monai(gen):
    ref = MonaiPatchDiscriminator(spatial_dims=2, in_channels=1, num_layers_d=3, num_channels=64).train()
    ours = PatchDiscriminator(1, 3, 64).train()
    assert list(ours.state_dict()) == list(ref.state_dict())  # same names, same order
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 1, 40, 40, generator=gen)
    expected = ref(x)[-1]
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
    # Training mode updated the BatchNorm statistics identically.
    torch.testing.assert_close(ours.state_dict()["0.adn.N.running_var"], ref.state_dict()["0.adn.N.running_var"])


@pytest.mark.parametrize("real", [True, False])
def test_least_squares_loss_matches_monai(gen, real):
    logits = torch.randn(3, 1, 5, 5, generator=gen)
    ref = _monai_adversarial_loss()(criterion="least_squares")(logits, target_is_real=real, for_discriminator=True)
    torch.testing.assert_close(adversarial_loss(logits, real), ref)


def test_ema_quantizer_matches_monai(gen):
    cfg = preset("tiny").vqgan
    ours = VQGAN(cfg).quantizer
    ref = EMAQuantizer(2, cfg.num_embeddings, cfg.embedding_dim, cfg.commitment_cost, cfg.ema_decay,
                       cfg.ema_epsilon, ddp_sync=False).train()
    ref.load_state_dict({k: v.clone() for k, v in ours.state_dict().items()})
    for _ in range(3):  # several updates: the EMA state carries over
        z = torch.randn(2, cfg.embedding_dim, 6, 6, generator=gen, requires_grad=True)
        zr = z.detach().clone().requires_grad_(True)
        q, loss = quantize_train(ours, z, cfg.commitment_cost, cfg.ema_decay, cfg.ema_epsilon, update=True)
        q_ref, loss_ref, _ = ref(zr)
        torch.testing.assert_close(q, q_ref)
        torch.testing.assert_close(loss, loss_ref)
        (q.sum() + loss).backward()
        (q_ref.sum() + loss_ref).backward()
        torch.testing.assert_close(z.grad, zr.grad)  # straight-through + commitment gradient
        for key, value in ref.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-5, atol=1e-6)
