"""The two BS-LDM networks: the VQGAN autoencoder and the conditional U-Net noise estimator."""

from .unet import UNet
from .vqgan import VQGAN

__all__ = ["UNet", "VQGAN"]
