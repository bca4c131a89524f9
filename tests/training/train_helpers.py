"""Helpers for the training tests: tiny synthetic CXR / soft-tissue pairs and tiny configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bsldm_fast.io.images import write_image

def make_pairs(root: Path, count: int = 8, size: int = 64, seed: int = 0, bits: int = 8) -> Path:
    """root/CXR/<i>.png and root/BS/<i>.png: a smooth 'soft tissue' blob field, plus bright
    horizontal 'ribs' on the CXR only."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    peak = 255 if bits == 8 else 65535
    dtype = np.uint8 if bits == 8 else np.uint16
    for i in range(count):
        soft = 0.25 + 0.1 * rng.random()
        for _ in range(3):
            cx, cy, r = rng.uniform(0.25, 0.75, 2).tolist() + [rng.uniform(0.1, 0.25)]
            soft = soft + 0.25 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
        phase = rng.uniform(0, 2 * np.pi)
        ribs = 0.2 * np.clip(np.sin(2 * np.pi * 5 * yy + phase + 2 * xx), 0, None) ** 2
        cxr = np.clip(soft + ribs, 0, 1)
        soft = np.clip(soft, 0, 1)
        write_image(root / "CXR" / f"{i:03d}.png", np.rint(cxr * peak).astype(dtype))
        write_image(root / "BS" / f"{i:03d}.png", np.rint(soft * peak).astype(dtype))
    return root


def tiny_config(stage: str, data: Path, out: Path, **overrides):
    """A tiny, fast, single-process CPU training config."""
    from bsldm_fast.training.config import make_config

    options = dict(data=str(data), out=str(out), model="tiny", batch_size=2, epochs=1, workers=0,
                   val_every=0, checkpoint_every=0, progress=False, tensorboard=False, device="cpu",
                   log_every=1)
    if stage == "vqgan":
        options["perceptual_weights"] = "random"
    options.update(overrides)
    return make_config(stage, overrides=options)


def tiny32_model(folder: Path) -> str:
    """The tiny architecture at 32 px (a 4 x 4 latent): the cheapest model that still trains."""
    from bsldm_fast.config import preset

    path = Path(folder) / "tiny32.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(preset("tiny").replace(image_size=32).to_json())
    return str(path)


def perturb(unet, model_config, seed: int = 11) -> None:
    """Give every U-Net weight a random non-zero value (a fresh U-Net zeroes its output layers,
    which makes most gradients of the first step exactly zero)."""
    import torch

    from bsldm_fast.modeldir import random_model

    state = random_model(model_config, seed=seed).unet.state_dict()
    with torch.no_grad():
        for name, p in unet.named_parameters():
            p.copy_(state[name])


def ddp_worker(rank: int, world: int, port: int, options: dict, batch_file: str, out: str) -> None:
    """One rank of a CPU (gloo) DDP run through the same code path as a single process:
    the gradients of one micro-batch of its shard, then a short full training run."""
    import os

    import torch
    from safetensors.torch import load_file, save_file

    from bsldm_fast.training import distributed, trainer
    from bsldm_fast.training.data import ShardSampler

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    config = tiny_config("ldm", options.pop("data"), options.pop("out"), **options)
    ctx = distributed.setup("cpu")
    try:
        model_config, vqgan = trainer.model_config_for(config)
        stage = trainer.build(config, ctx, 10, model_config, vqgan)
        perturb(stage.unet, model_config)
        batch = load_file(batch_file)
        sampler = ShardSampler(len(batch["index"]), rank, world, seed=0, shuffle=False)
        mine = torch.tensor(sampler.indices())
        stage.train_step((batch["cxr"][mine], batch["bs"][mine], batch["index"][mine]), epoch=0)
        grads = {n: p.grad.contiguous() for n, p in stage.unet.named_parameters()}
        save_file(grads, str(Path(out) / f"grads-{rank}.safetensors"))
        trainer._train(config.replace(batch_size=config.batch_size // world), ctx)
    finally:
        distributed.cleanup(ctx)
