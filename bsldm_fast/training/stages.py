"""The two training stages of BS-LDM: the VQGAN autoencoder and the conditional latent diffusion model.

Each stage owns its networks, optimisers, schedulers and grad scalers, and offers the same small
interface to the loop in `trainer.py`: `train_step` (forward + backward of one micro-batch),
`optimizer_step`, `val_loss`, `validate_images`, `state_dict` / `load_state_dict` and `export`.
Recipes: the authors' `vq-gan_train.py` and `ldm_train.py` (repository diaoquesang/BS-LDM).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .. import modeldir
from .._files import atomic_write
from ..config import ModelConfig, preset
from ..diffusion import Schedule
from ..diffusion.conditioning import condition_scale, scale_condition
from ..models import VQGAN, UNet
from ..pipeline import Pipeline
from ..preprocess import from_model_range
from . import checkpoint
from .config import TrainConfig
from .data import sample_generator
from .discriminator import PairedCritic, PatchDiscriminator
from .distributed import Context
from .ema import EMA
from .losses import VQGANForward, adversarial_loss
from .perceptual import load_lpips

logger = logging.getLogger(__name__)

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# Streams of `sample_generator` keys, so that no two uses share random numbers.
TRAIN_NOISE_STREAM = 2
VAL_NOISE_STREAM = 3


def model_config_from(spec: str) -> ModelConfig:
    """A preset name or a ModelConfig JSON file (a model directory's config.json works too)."""
    path = Path(spec)
    if path.is_dir():
        path = path / modeldir.CONFIG_FILE
    if path.suffix == ".json" and path.is_file():
        return ModelConfig.load(path)
    return preset(spec)


def _wrap(module: nn.Module, ctx: Context) -> nn.Module:
    if not ctx.distributed:
        return module
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DDP(module, device_ids=ids)


def _no_sync(module: nn.Module, sync: bool):
    """Skip DDP's gradient all-reduce on accumulation micro-steps that are not the last."""
    if sync or not isinstance(module, DDP):
        return contextlib.nullcontext()
    return module.no_sync()


def _autocast(ctx: Context, precision: str):
    dtype = AUTOCAST[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(ctx.device.type, dtype=dtype)


def _scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int):
    # The original steps MultiStepLR every iteration with milestones epoch * len(loader).
    milestones = [m * steps_per_epoch for m in (config.milestones or ())]
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=config.gamma)


def model_range_to_unit_numpy(images: torch.Tensor) -> list[np.ndarray]:
    """[B, 1, S, S] in [-1, 1] -> list of [S, S] float64 in [0, 1], clipped: what the metrics take."""
    return [from_model_range(x[0].double().cpu().clamp(-1, 1)).numpy() for x in images]


class Stage:
    """Shared plumbing: device, precision, grad scalers, checkpoint helpers."""

    name = ""

    def __init__(self, config: TrainConfig, model_config: ModelConfig, ctx: Context):
        self.config = config
        self.model_config = model_config
        self.ctx = ctx
        self.scaler_enabled = config.precision == "fp16"

    def _scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.ctx.device.type, enabled=self.scaler_enabled)

    def autocast(self):
        return _autocast(self.ctx, self.config.precision)

    def metric_lpips(self):
        """The evaluation LPIPS (AlexNet) when its package and weights are local, else None."""
        if not hasattr(self, "_lpips"):
            from .. import metrics

            self._lpips, reason = metrics.load_lpips()
            if reason:
                logger.info("validation without LPIPS: %s", reason)
        return self._lpips


class VQGANStage(Stage):
    """L1 + commitment + 0.001 perceptual + 0.01 least-squares patch-GAN (Sun et al. 2025, Sec. III-A)."""

    name = "vqgan"

    def __init__(self, config: TrainConfig, model_config: ModelConfig, ctx: Context,
                 steps_per_epoch: int):
        super().__init__(config, model_config, ctx)
        self.vqgan = VQGAN(model_config.vqgan).to(ctx.device).train()
        self.generator = _wrap(VQGANForward(self.vqgan), ctx)
        self.discriminator = PatchDiscriminator(model_config.vqgan.in_channels, config.disc_layers,
                                                config.disc_channels).to(ctx.device).train()
        self.critic = _wrap(PairedCritic(self.discriminator), ctx)
        self.perceptual = None
        if config.perceptual and config.perceptual_weight > 0:
            self.perceptual = load_lpips(config.perceptual_weights).to(ctx.device)
        self.opt_g = torch.optim.Adam([p for p in self.vqgan.parameters() if p.requires_grad], lr=config.lr)
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=config.lr_d)
        self.sched_g = _scheduler(self.opt_g, config, steps_per_epoch)
        self.sched_d = _scheduler(self.opt_d, config, steps_per_epoch)
        self.scaler_g, self.scaler_d = self._scaler(), self._scaler()

    def train_step(self, batch: Any, epoch: int, sync: bool = True, scale: float = 1.0) -> dict[str, float]:
        images = batch[0].to(self.ctx.device, non_blocking=True)
        cfg = self.config
        # Generator: the critic's weights are frozen here; the original computed and then
        # discarded their gradients, which is the same update.
        self.discriminator.requires_grad_(False)
        with _no_sync(self.generator, sync):
            with self.autocast():
                recon, q_loss = self.generator(images)
                recon, target = recon.float(), images.float()
                rec_loss = F.l1_loss(recon, target)
                g_adv = adversarial_loss(self.discriminator(recon.contiguous()), True)
                p_loss = (self.perceptual(recon, target).mean() if self.perceptual is not None
                          else torch.zeros((), device=images.device))
                loss_g = rec_loss + q_loss + cfg.perceptual_weight * p_loss + cfg.adv_weight * g_adv
            self.scaler_g.scale(loss_g * scale).backward()
        self.discriminator.requires_grad_(True)
        # Discriminator on the same reconstruction, detached (fake and real as separate batches).
        with _no_sync(self.critic, sync):
            with self.autocast():
                logits_fake, logits_real = self.critic(recon.detach().contiguous(), target)
                d_loss = 0.5 * (adversarial_loss(logits_fake, False) + adversarial_loss(logits_real, True))
            self.scaler_d.scale(cfg.adv_weight * d_loss * scale).backward()
        return {"loss": loss_g.item(), "recons_loss": rec_loss.item(), "quant_loss": q_loss.item(),
                "perceptual_loss": p_loss.item(), "gen_loss": g_adv.item(), "disc_loss": d_loss.item()}

    def optimizer_step(self) -> None:
        for opt, sched, scaler in ((self.opt_g, self.sched_g, self.scaler_g),
                                   (self.opt_d, self.sched_d, self.scaler_d)):
            scaler.step(opt)
            scaler.update()
            sched.step()
            opt.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return self.opt_g.param_groups[0]["lr"]

    @torch.no_grad()
    def val_loss(self, batch: Any) -> dict[str, float]:
        images = batch[0].to(self.ctx.device)
        self.vqgan.eval()
        recon = self.vqgan(images)
        self.vqgan.train()
        return {"recons_loss": float(F.l1_loss(recon.float(), images.float()))}

    @torch.no_grad()
    def validate_images(self, cxr: torch.Tensor, bs: torch.Tensor) -> tuple[list[np.ndarray], list[dict]]:
        """Reconstructions of the soft-tissue images and their scores against the originals."""
        from .. import metrics

        self.vqgan.eval()
        recon = self.vqgan(bs.to(self.ctx.device)).float().cpu()
        self.vqgan.train()
        preds, targets = model_range_to_unit_numpy(recon), model_range_to_unit_numpy(bs)
        lp = self.metric_lpips()
        scores = [metrics.evaluate(p, t, lpips_model=lp, size=None).as_dict() for p, t in zip(preds, targets)]
        return [np.concatenate([t, p], axis=1) for t, p in zip(targets, preds)], scores

    def state_dict(self) -> dict[str, Any]:
        return {"vqgan": self.vqgan.state_dict(), "discriminator": self.discriminator.state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
                "sched_g": self.sched_g.state_dict(), "sched_d": self.sched_d.state_dict(),
                "scaler_g": self.scaler_g.state_dict(), "scaler_d": self.scaler_d.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        modeldir.check_state_dict(self.vqgan, state["vqgan"], "checkpoint vqgan")
        self.vqgan.load_state_dict(state["vqgan"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.sched_g.load_state_dict(state["sched_g"])
        self.sched_d.load_state_dict(state["sched_d"])
        if state["scaler_g"]:
            self.scaler_g.load_state_dict(state["scaler_g"])
            self.scaler_d.load_state_dict(state["scaler_d"])

    def export(self, path: Path, overwrite: bool) -> Path:
        return save_vqgan(path, self.model_config, self.vqgan, overwrite)


class LDMStage(Stage):
    """eps-prediction on the soft-tissue latent conditioned on the CXR latent (Sun et al. 2025, Sec. III-B)."""

    name = "ldm"

    def __init__(self, config: TrainConfig, model_config: ModelConfig, ctx: Context,
                 steps_per_epoch: int, vqgan: VQGAN):
        super().__init__(config, model_config, ctx)
        self.memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        self.vqgan = vqgan.to(ctx.device, memory_format=self.memory_format).eval().requires_grad_(False)
        self.unet = UNet(model_config.unet).to(ctx.device, memory_format=self.memory_format).train()
        self.model = _wrap(self.unet, ctx)
        self.ema = EMA(self.unet, config.ema_decay)
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=config.lr)
        self.sched = _scheduler(self.opt, config, steps_per_epoch)
        self.scaler = self._scaler()
        d = model_config.diffusion
        self.channels = d.latent_channels
        self.num_timesteps = d.num_train_timesteps
        self.offset = d.offset_noise_coefficient if config.offset_noise else 0.0
        # diffusers' add_noise: sqrt of the float32 alpha_bar, in float32.
        alpha_bar = Schedule.from_config(d).alphas_cumprod.float()
        self.sqrt_ab = (alpha_bar**0.5).to(ctx.device)
        self.sqrt_1m_ab = ((1 - alpha_bar) ** 0.5).to(ctx.device)
        scale = condition_scale(d)
        self.cond_scale = None if scale is None else scale.to(ctx.device)

    def _draws(self, indices: torch.Tensor, shape: tuple[int, ...], *key: int):
        """Per-sample timestep and offset noise, keyed by the sample (not the rank or batch layout)."""
        ts, noises = [], []
        for i in indices.tolist():
            g = sample_generator(self.config.seed, *key, int(i))
            t = torch.randint(0, self.num_timesteps, (1,), generator=g)
            eps = torch.randn(shape, generator=g)
            if self.offset:
                eps = eps + self.offset * torch.randn((shape[0], 1, 1), generator=g)
            ts.append(t)
            noises.append(eps)
        return torch.cat(ts).to(self.ctx.device), torch.stack(noises).to(self.ctx.device)

    def _loss(self, model: nn.Module, batch: Any, key: tuple[int, ...]) -> torch.Tensor:
        cxr, bs, indices = batch
        with torch.no_grad():
            images = torch.cat([cxr, bs]).to(self.ctx.device, non_blocking=True).float()
            c, x0 = self.vqgan.encode_latent(images.contiguous(memory_format=self.memory_format)).chunk(2)
        t, eps = self._draws(indices, tuple(x0.shape[1:]), *key)
        a = self.sqrt_ab[t].view(-1, 1, 1, 1)
        x_t = a * x0 + self.sqrt_1m_ab[t].view(-1, 1, 1, 1) * eps
        # 'original': the original noised cat(soft, cxr) with zero noise on the CXR half; the
        # scale is the sampler's (diffusion.conditioning), so the U-Net trains on what it will see.
        cond = scale_condition(c, t, self.cond_scale)
        with self.autocast():
            pred = model(torch.cat([x_t, cond], dim=1).contiguous(memory_format=self.memory_format), t)
        return F.mse_loss(pred[:, : self.channels].float(), eps)

    def train_step(self, batch: Any, epoch: int, sync: bool = True, scale: float = 1.0) -> dict[str, float]:
        with _no_sync(self.model, sync):
            loss = self._loss(self.model, batch, (TRAIN_NOISE_STREAM, epoch))
            self.scaler.scale(loss * scale).backward()
        return {"loss": loss.item()}

    def optimizer_step(self) -> None:
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        self.ema.update(self.unet)
        self.opt.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def ema_unet(self) -> UNet:
        unet = copy.deepcopy(self.unet).eval()
        self.ema.copy_to(unet)
        return unet

    @torch.no_grad()
    def val_loss(self, batch: Any, unet: UNet | None = None) -> dict[str, float]:
        # Fixed noise per validation pair, so the curve moves only with the weights.
        return {"loss": float(self._loss(unet or self.ema_unet(), batch, (VAL_NOISE_STREAM,)))}

    @torch.no_grad()
    def validate_images(self, cxr: torch.Tensor, bs: torch.Tensor, unet: UNet | None = None):
        """Soft-tissue images sampled with the EMA weights; BSR/MSE/PSNR/SSIM against the targets."""
        from .. import metrics

        pipe = Pipeline.create(self.model_config, self.vqgan, unet or self.ema_unet(), self.ctx.device)
        seeds = [self.config.seed] * cxr.shape[0]
        pred = pipe.run(cxr.to(self.ctx.device), seeds, self.config.val_sampler,
                        self.config.val_steps).float().cpu()
        c, t, p = (model_range_to_unit_numpy(x) for x in (cxr, bs, pred))
        lp = self.metric_lpips()
        scores = [metrics.evaluate(pi, ti, ci, lp, size=None).as_dict() for pi, ti, ci in zip(p, t, c)]
        return [np.concatenate([ci, pi, ti], axis=1) for ci, pi, ti in zip(c, p, t)], scores

    def state_dict(self) -> dict[str, Any]:
        return {"unet": self.unet.state_dict(), "ema": self.ema.state_dict(),
                "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        modeldir.check_state_dict(self.unet, state["unet"], "checkpoint unet")
        self.unet.load_state_dict(state["unet"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])

    def export(self, path: Path, overwrite: bool) -> Path:
        unet = self.ema_unet() if self.config.export_ema else self.unet
        return modeldir.save(path, self.model_config, self.vqgan, unet, overwrite=overwrite)


# ----------------------------------------------------------------------------- VQGAN files


def save_vqgan(path: Path, config: ModelConfig, vqgan: VQGAN, overwrite: bool) -> Path:
    """A VQGAN export: config.json + vqgan.safetensors (a model directory without its U-Net)."""
    path = Path(path)
    existing = [n for n in (modeldir.CONFIG_FILE, modeldir.VQGAN_FILE) if (path / n).exists()]
    if existing and not overwrite:
        raise modeldir.ModelDirError(f"{path} already holds {existing}; refusing to overwrite")
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in vqgan.state_dict().items()}
    meta = {"format": "bsldm_fast", "config_version": str(config.version)}
    atomic_write(path / modeldir.VQGAN_FILE, lambda f: save_file(state, f, metadata=meta))
    atomic_write(path / modeldir.CONFIG_FILE, lambda f: Path(f).write_text(config.to_json()))
    return path


def load_vqgan(spec: str | Path) -> tuple[ModelConfig, VQGAN]:
    """The VQGAN of a model directory, a VQGAN export, a VQGAN run folder or a VQGAN checkpoint."""
    path = Path(spec)
    if (path / checkpoint.STATE_JSON).is_file():
        state = checkpoint.load(path)
        if state.get("stage") != "vqgan":
            raise modeldir.ModelDirError(f"{path} is a {state.get('stage')} checkpoint, not a VQGAN one")
        config = ModelConfig.from_dict(state["model_config"])
        weights = state["stage_state"]["vqgan"]
    elif (path / modeldir.CONFIG_FILE).is_file() and (path / modeldir.VQGAN_FILE).is_file():
        config = ModelConfig.load(path / modeldir.CONFIG_FILE)
        weights = load_file(str(path / modeldir.VQGAN_FILE))
    elif (path / "model").is_dir():
        return load_vqgan(path / "model")
    elif (found := checkpoint.latest(path / "checkpoints")) is not None:
        return load_vqgan(found)
    else:
        raise modeldir.ModelDirError(
            f"{spec}: not a VQGAN: expected a model directory (config.json + vqgan.safetensors), "
            "a VQGAN training run folder, or one of its checkpoints"
        )
    vqgan = VQGAN(config.vqgan)
    modeldir.check_state_dict(vqgan, weights, f"{spec} (vqgan)")
    vqgan.load_state_dict({k: v.float() for k, v in weights.items()})
    return config, vqgan.eval()


def ldm_model_config(config: TrainConfig, vqgan_config: ModelConfig) -> ModelConfig:
    """The LDM's model: the U-Net and schedule of `config.model`, the VQGAN (and resolution) it is
    given, and the training's condition scaling."""
    base = model_config_from(config.model)
    if base.vqgan != vqgan_config.vqgan or base.image_size != vqgan_config.image_size:
        logger.warning("the VQGAN (%s, %d px) differs from the '%s' config's; using the VQGAN's",
                       vqgan_config.name, vqgan_config.image_size, config.model)
    diffusion = dataclasses.replace(base.diffusion, condition_scaling=config.condition_scaling)
    return base.replace(image_size=vqgan_config.image_size, vqgan=vqgan_config.vqgan,
                        diffusion=diffusion)
