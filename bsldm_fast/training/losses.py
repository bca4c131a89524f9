"""Training losses and the training-mode VQGAN forward (EMA codebook update + commitment loss).

Sources: monai-generative's `EMAQuantizer` and `PatchAdversarialLoss(criterion="least_squares")`,
as BS-LDM's `vq-gan_train.py` uses them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..models import VQGAN


def adversarial_loss(logits: torch.Tensor, target_is_real: bool) -> torch.Tensor:
    """Least-squares GAN loss as monai-generative computes it: MSE(leaky_relu(logits, 0.05), 1 or 0)."""
    x = F.leaky_relu(logits.float(), 0.05)
    return F.mse_loss(x, torch.full_like(x, 1.0 if target_is_real else 0.0))


def quantize_train(codebook: nn.Module, z: torch.Tensor, commitment_cost: float, decay: float,
                   epsilon: float, update: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise `z` with the straight-through estimator; (quantised, commitment loss).

    With `update`, the codebook moves by EMA towards its assigned encodings (monai-generative's
    `EMAQuantizer`, van den Oord et al. 2017, App. A.1), the statistics summed over DDP ranks.
    The returned codes are looked up before the update, as monai does.
    """
    z = z.float()
    indices = codebook.indices(z)
    quantized = codebook.embed(indices)
    if update:
        with torch.no_grad():
            flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
            onehot = F.one_hot(indices.flatten(), codebook.embedding.num_embeddings).float()
            counts = onehot.sum(0)
            dw = onehot.t() @ flat
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(counts)
                dist.all_reduce(dw)
            codebook.ema_cluster_size.mul_(decay).add_(counts * (1 - decay))
            n = codebook.ema_cluster_size.sum()
            size = (codebook.ema_cluster_size + epsilon) / (n + counts.numel() * epsilon) * n
            codebook.ema_w.mul_(decay).add_(dw * (1 - decay))
            codebook.embedding.weight.copy_(codebook.ema_w / size.unsqueeze(1))
    loss = commitment_cost * F.mse_loss(quantized.detach(), z)
    return z + (quantized - z).detach(), loss


class VQGANForward(nn.Module):
    """images -> (reconstruction, quantisation loss): monai-generative `VQVAE.forward` in training.

    The module DDP wraps in the VQGAN stage; `vqgan` is the bsldm_fast model being trained.
    """

    def __init__(self, vqgan: VQGAN):
        super().__init__()
        self.vqgan = vqgan

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.vqgan.config
        z = self.vqgan.encode(images)
        # NOTE: monai runs the quantiser outside autocast; so do we.
        with torch.autocast(images.device.type, enabled=False):
            quantized, loss = quantize_train(self.vqgan.quantizer, z, cfg.commitment_cost,
                                             cfg.ema_decay, cfg.ema_epsilon, self.training)
        return self.vqgan.decode(quantized.to(z.dtype)), loss
