"""The training loop shared by both stages: data, epochs, accumulation, logging, validation,
checkpoints, resume and the final export. One process or many (torchrun), the same code.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from .._files import atomic_write
from ..config import ModelConfig
from . import checkpoint, distributed
from .config import TrainConfig
from .data import PairedDataset, ShardSampler, SingleImages, read_split, seed_worker, split_files
from .logs import RunLog
from .stages import LDMStage, Stage, VQGANStage, ldm_model_config, load_vqgan, model_config_from

logger = logging.getLogger(__name__)

CONFIG_FILE = "train_config.json"


def _datasets(config: TrainConfig, image_size: int, ctx: distributed.Context, out: Path):
    if ctx.main:
        split_files(config.data, config.split_dir or None, out, config.val_fraction, config.split_seed)
    distributed.barrier(ctx)
    train_file, val_file = split_files(config.data, config.split_dir or None, out,
                                       config.val_fraction, config.split_seed)
    aug = dict(max_rotate=config.max_rotate, max_translate=config.max_translate,
               max_scale=config.max_scale, intensity_jitter=config.intensity_jitter)
    train = PairedDataset(config.data, read_split(train_file, config.data), image_size,
                          config.augment, config.seed, crop_size=config.crop_size, **aug)
    val_names = read_split(val_file, config.data)
    val = PairedDataset(config.data, val_names, image_size) if val_names else None
    if config.stage == "vqgan":
        return SingleImages(train), (SingleImages(val) if val is not None else None), val
    return train, val, val


def _loader(dataset, sampler: ShardSampler, config: TrainConfig, ctx: distributed.Context,
            epoch: int) -> DataLoader:
    # NOTE: an explicit generator keeps the DataLoader off the global RNG, so resuming mid-epoch
    # leaves every random state where the uninterrupted run has it.
    return DataLoader(dataset, batch_size=config.batch_size, sampler=sampler,
                      num_workers=config.workers, worker_init_fn=seed_worker,
                      pin_memory=ctx.device.type == "cuda", persistent_workers=False,
                      generator=torch.Generator().manual_seed(config.seed + epoch))


def model_config_for(config: TrainConfig) -> tuple[ModelConfig, Any]:
    """The model this run trains, and (ldm) the frozen VQGAN it is built on."""
    if config.stage == "vqgan":
        return model_config_from(config.model), None
    vqgan_config, vqgan = load_vqgan(config.vqgan)
    return ldm_model_config(config, vqgan_config), vqgan


def build(config: TrainConfig, ctx: distributed.Context, steps_per_epoch: int,
          model_config: ModelConfig, vqgan: Any = None) -> Stage:
    """The stage's networks on this rank (same initial weights on every rank: seeded)."""
    torch.manual_seed(config.seed)
    if config.stage == "vqgan":
        return VQGANStage(config, model_config, ctx, steps_per_epoch)
    return LDMStage(config, model_config, ctx, steps_per_epoch, vqgan)


def train(config: TrainConfig) -> Path | None:
    """Run a training stage to the end; returns the exported model folder (on rank 0)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    ctx = distributed.setup(config.device)
    try:
        return _train(config, ctx)
    finally:
        distributed.cleanup(ctx)


def _train(config: TrainConfig, ctx: distributed.Context) -> Path | None:
    out = Path(config.out)
    export = Path(config.export) if config.export else out / "model"
    ckpt_dir = out / "checkpoints"
    resume = _resume_path(config, ckpt_dir)
    model_config, vqgan = model_config_for(config)  # fails early on a bad --model or --vqgan
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        if config.export and not resume and any(export.glob("*.safetensors")):
            raise FileExistsError(f"{export} already holds a model; choose another --export")
    distributed.barrier(ctx)

    train_set, val_set, val_pairs = _datasets(config, model_config.image_size, ctx, out)
    sampler = ShardSampler(len(train_set), ctx.rank, ctx.world, config.seed)
    micro_per_epoch = math.ceil(len(sampler) / config.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / config.grad_accum)
    stage = build(config, ctx, steps_per_epoch, model_config, vqgan)

    log = RunLog(out, ctx.main, config.tensorboard)
    if ctx.main:
        text = config.to_json()
        atomic_write(out / CONFIG_FILE, lambda f: Path(f).write_text(text))
        atomic_write(out / "model_config.json", lambda f: Path(f).write_text(stage.model_config.to_json()))
        print(f"training {config.stage} on {ctx.world} process(es), device {ctx.device}; resolved config:\n"
              + text, flush=True)
        print(f"{len(train_set)} training {'images' if config.stage == 'vqgan' else 'pairs'}, "
              f"{0 if val_pairs is None else len(val_pairs)} validation pairs, "
              f"{steps_per_epoch} optimiser steps per epoch", flush=True)

    epoch, start_micro, step = 0, 0, 0
    if resume is not None:
        epoch, start_micro, step = _restore(stage, resume, config)
        if ctx.main:
            print(f"resumed from {resume} at epoch {epoch}, step {step}", flush=True)

    saved_at = [step if resume is not None else -1]

    def save(at_epoch: int, at_micro: int) -> None:
        """Checkpoint the position (epoch, micro-batches done in it) after optimiser step `step`."""
        if ctx.main:
            state = {"stage": config.stage, "epoch": at_epoch, "micro": at_micro, "step": step,
                     "model_config": stage.model_config.to_dict(), "train_config": config.to_dict(),
                     "stage_state": stage.state_dict(), "rng": checkpoint.rng_state()}
            checkpoint.save(ckpt_dir, f"step-{step:08d}", state, config.keep_checkpoints)
        saved_at[0] = step
        distributed.barrier(ctx)

    accum = config.grad_accum
    images_per_micro = config.batch_size * ctx.world
    done = config.max_steps > 0 and step >= config.max_steps
    micro = start_micro
    while epoch < config.epochs and not done:
        sampler.set_epoch(epoch, micro * config.batch_size)
        train_set.set_epoch(epoch)
        loader = _loader(train_set, sampler, config, ctx, epoch)
        bar = log.progress(micro_per_epoch, f"epoch {epoch}", config.progress, initial=micro)
        sums: dict[str, float] = {}
        count = 0
        tick = time.perf_counter()
        for batch in loader:
            group_start = (micro // accum) * accum
            group = min(accum, micro_per_epoch - group_start)
            micro += 1
            last_of_step = micro - group_start == group
            values = stage.train_step(batch, epoch, sync=last_of_step, scale=1.0 / group)
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
            bar.update(1)
            if not last_of_step:
                continue
            stage.optimizer_step()
            step += 1
            if not all(math.isfinite(v) for v in values.values()):
                raise FloatingPointError(f"non-finite loss at step {step}: {values}")
            end_of_epoch = micro == micro_per_epoch
            last = bool(config.max_steps) and step >= config.max_steps
            if step % config.log_every == 0 or end_of_epoch or last:
                now = time.perf_counter()
                means = distributed.mean(ctx, {k: v / count for k, v in sums.items()})
                means["lr"] = stage.lr()
                means["images_per_s"] = images_per_micro * count / max(now - tick, 1e-9)
                log.scalars("train", step, epoch, means)
                bar.set_postfix({k: f"{v:.4g}" for k, v in means.items() if k != "lr"})
                sums, count, tick = {}, 0, time.perf_counter()
            if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
                save(epoch + 1, 0) if end_of_epoch else save(epoch, micro)
            if last:
                done = True
                break
        bar.close()
        if micro < micro_per_epoch:
            break  # stopped by max_steps inside the epoch
        epoch, micro = epoch + 1, 0
        if config.val_every and epoch % config.val_every == 0 and val_set is not None:
            _validate(stage, val_set, val_pairs, config, ctx, log, step, epoch, out)
        if config.checkpoint_every and epoch % config.checkpoint_every == 0 and saved_at[0] != step:
            save(epoch, 0)
    if saved_at[0] != step:
        save(epoch, micro)
    log.close()
    if not ctx.main:
        return None
    path = stage.export(export, overwrite=True)
    write_training_data(path, config)
    print(f"exported the {config.stage} model to {path}", flush=True)
    return path


TRAINING_DATA_FILE = "training_data.json"
"""Beside an exported model: which real images trained it, so that nobody scores it on them."""


def _training_data_of(folder: Path) -> dict[str, Any] | None:
    for candidate in (folder / TRAINING_DATA_FILE, folder / "model" / TRAINING_DATA_FILE):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return None


def trained_real_pairs(model_dir: str | Path) -> list[str] | None:
    """The real pairs a model directory says trained it, or None when it does not say."""
    path = Path(model_dir) / TRAINING_DATA_FILE
    if not path.is_file():
        return None
    pairs = json.loads(path.read_text()).get("real_pairs")
    return None if pairs is None else [str(n) for n in pairs]


def write_training_data(model_dir: Path, config: TrainConfig) -> None:
    """Record the data of this stage (and, for the LDM, of its VQGAN) in `training_data.json`.

    Real pairs are known when the data folder was written by the data engine (its `engine.json`
    names them); otherwise the data folder itself is named and `real_pairs` is null (unknown).
    """
    engine_file = Path(config.data) / "engine.json"
    engine = json.loads(engine_file.read_text()) if engine_file.is_file() else None
    stages = {config.stage: {"data": str(config.data), "engine": engine,
                             "real_pairs": engine["train"] if engine else None}}
    if config.stage == "ldm" and config.vqgan:
        previous = _training_data_of(Path(config.vqgan))
        stages["vqgan"] = (previous or {}).get("stages", {}).get("vqgan") or {
            "data": str(config.vqgan), "real_pairs": None}
    pairs = [s["real_pairs"] for s in stages.values()]
    record = {"real_pairs": None if any(p is None for p in pairs)
              else sorted({str(n) for p in pairs for n in p}), "stages": stages}
    (Path(model_dir) / TRAINING_DATA_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _resume_path(config: TrainConfig, ckpt_dir: Path) -> Path | None:
    if not config.resume:
        return None
    if config.resume == "auto":
        found = checkpoint.latest(ckpt_dir)
        if found is None:
            logger.warning("--resume auto: no checkpoint in %s yet; starting a fresh run", ckpt_dir)
        return found
    path = Path(config.resume)
    if (path / "checkpoints").is_dir():
        path = checkpoint.latest(path / "checkpoints") or path
    return path


def _restore(stage: Stage, path: Path, config: TrainConfig) -> tuple[int, int, int]:
    state = checkpoint.load(path)
    if state["stage"] != config.stage:
        raise checkpoint.CheckpointError(f"{path} is a {state['stage']} checkpoint, not {config.stage}")
    saved = ModelConfig.from_dict(state["model_config"])
    # The input normalisation (pixels before and after the model) and dynamic clipping (sampling
    # only: training never clips) shape no weight, so a run may resume with other ones; the
    # export takes the new ones.
    current = stage.model_config
    diffusion = dataclasses.replace(saved.diffusion, **{k: getattr(current.diffusion, k) for k in (
        "clip_sample", "clip_range_start", "clip_range_rate")})
    saved = saved.replace(input_normalization=current.input_normalization, diffusion=diffusion)
    if saved != stage.model_config:
        raise checkpoint.CheckpointError(f"{path} was trained with another model config than this run's")
    old = state["train_config"]
    for key in ("batch_size", "grad_accum", "seed"):
        if old.get(key) != getattr(config, key):
            logger.warning("resuming with %s=%s (the checkpoint used %s): the run will not be "
                           "bit-identical to an uninterrupted one", key, getattr(config, key), old.get(key))
    stage.load_state_dict(state["stage_state"])
    checkpoint.set_rng_state(state["rng"])
    return int(state["epoch"]), int(state["micro"]), int(state["step"])


def _validate(stage: Stage, val_set, val_pairs, config: TrainConfig, ctx: distributed.Context,
              log: "RunLog", step: int, epoch: int, out: Path) -> None:
    """Validation loss on the held-out split (all ranks share the work), then, on rank 0, a few
    sampled images with their metrics."""
    sampler = ShardSampler(len(val_set), ctx.rank, ctx.world, config.seed, shuffle=False)
    loader = DataLoader(val_set, batch_size=config.batch_size, sampler=sampler, num_workers=0)
    extra: dict[str, Any] = {}
    if isinstance(stage, LDMStage):
        extra["unet"] = stage.ema_unet()
    sums: dict[str, float] = {}
    n = 0
    for i, batch in enumerate(loader):
        if config.val_batches and i >= config.val_batches:
            break
        for k, v in stage.val_loss(batch, **extra).items():
            sums[k] = sums.get(k, 0.0) + v
        n += 1
    values = distributed.mean(ctx, {k: v / max(n, 1) for k, v in sums.items()})
    if ctx.main and config.val_samples and val_pairs is not None:
        count = min(config.val_samples, len(val_pairs))
        items = [val_pairs[i] for i in range(count)]
        cxr = torch.stack([c for c, _, _ in items])
        bs = torch.stack([b for _, b, _ in items])
        panels, scores = stage.validate_images(cxr, bs, **extra)
        for key in scores[0]:
            vals = [s[key] for s in scores if s[key] is not None and math.isfinite(s[key])]
            if vals:
                values[key] = float(np.mean(vals))
        log.images(out / "samples" / f"epoch-{epoch:05d}", [val_pairs.names[i] for i in range(count)], panels)
    log.scalars("val", step, epoch, values)
    if ctx.main:
        print(f"validation after epoch {epoch}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()),
              file=sys.stderr, flush=True)
