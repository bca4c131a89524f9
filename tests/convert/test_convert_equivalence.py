"""Converted networks compute what the original third-party code computes.

Each original is built at a small size with random non-zero weights, saved whole with
`torch.save(model)` (as BS-LDM saved its checkpoints), converted without importing its code, and
compared on fresh random inputs. Tolerance: float32 rounding, relative error <= 1e-5 for the
networks and <= 1e-6 per step for the 1000-step sampler.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch

from bsldm_fast.config import DiffusionConfig
from bsldm_fast.convert import load_checkpoints
from bsldm_fast.diffusion import Schedule, plan_timesteps, sample

from .conftest import UNET_VARIANT_KW, make_unet, make_vqvae, rel_error

NET_TOL = 1e-5
STEP_TOL = 1e-6
TRAJECTORY_TOL = 1e-6


def _check_unet(original, model, gen, report):
    """Noise estimates at several timesteps, one per sample, on a fresh random input."""
    c, size = original.in_channels, original.image_size
    x = torch.randn(4, c, size, size, generator=gen)
    t = torch.tensor([0, 17, 500, 999])
    with torch.no_grad():
        theirs, ours = original(x, t), model.unet(x, t)
    error = rel_error(ours, theirs)
    report(error)
    assert ours.shape == theirs.shape
    assert error <= NET_TOL


def test_vqgan_matches_monai_generative(originals, converted, gen, record_property):
    original, model = originals[1], converted
    images = torch.rand(2, 1, 64, 64, generator=gen) * 2 - 1
    with torch.no_grad():
        z_theirs, z_ours = original.encode(images), model.vqgan.encode(images)
        idx_theirs = original.index_quantize(images)
        idx_ours = model.vqgan.quantizer.indices(z_ours)
        q_theirs, q_ours = original.encode_stage_2_inputs(images), model.vqgan.encode_latent(images)
        latent = torch.randn(2, 4, 8, 8, generator=gen)  # sampled latents are decoded unquantised
        dec_theirs, dec_ours = original.decode(latent), model.vqgan.decode(latent)
    record_property("vqgan_encode_rel_error", rel_error(z_ours, z_theirs))
    record_property("vqgan_quantised_rel_error", rel_error(q_ours, q_theirs))
    record_property("vqgan_decode_rel_error", rel_error(dec_ours, dec_theirs))
    assert rel_error(z_ours, z_theirs) <= NET_TOL
    assert torch.equal(idx_ours, idx_theirs)
    assert rel_error(q_ours, q_theirs) <= NET_TOL
    assert rel_error(dec_ours, dec_theirs) <= NET_TOL
    # The codebook's EMA state travels too (under our name).
    assert torch.equal(model.vqgan.quantizer.ema_w, original.quantizer.quantizer.ema_w)


def test_unet_matches_guided_diffusion(originals, converted, gen, record_property):
    _check_unet(originals[0], converted, gen, lambda e: record_property("unet_rel_error", e))


def test_unet_variant_matches_guided_diffusion(tmp_path, originals, gen, record_property):
    """Conv up/down, additive embedding, the new attention order and fixed head width."""
    original = make_unet(seed=3, **UNET_VARIANT_KW)
    torch.save(original, tmp_path / "LDM.pth")
    model = load_checkpoints(tmp_path / "LDM.pth", originals[2] / "VQGAN.pth")
    u = model.config.unet
    assert (u.resblock_updown, u.use_scale_shift_norm, u.use_new_attention_order,
            u.num_head_channels, u.attention_resolutions) == (False, False, True, 16, (1, 4))
    _check_unet(original, model, gen, lambda e: record_property("unet_variant_rel_error", e))


def test_unet_pickled_from_vendored_modules_path(vendored_modules, tmp_path, originals, gen,
                                                 record_property):
    """BS-LDM's own layout: the U-Net class lives at `modules.unet`, GroupNorm32 at `modules.nn`."""
    original = make_unet(seed=4, package=vendored_modules)
    assert type(original).__module__ == "modules.unet"
    torch.save(original, tmp_path / "ldm-final-myModel.pth")
    model = load_checkpoints(tmp_path / "ldm-final-myModel.pth", originals[2] / "VQGAN.pth")
    _check_unet(original, model, gen, lambda e: record_property("unet_modules_path_rel_error", e))


def test_conversion_imports_none_of_the_original_code(originals, tmp_path):
    """In a fresh interpreter, converting both checkpoints imports neither network's package."""
    unet, vqgan, out_dir = (str(originals[2] / "LDM.pth"), str(originals[2] / "VQGAN.pth"),
                            str(tmp_path / "model"))
    script = (
        "import json, sys\n"
        "from bsldm_fast.convert import convert\n"
        f"convert({unet!r}, {vqgan!r}, {out_dir!r})\n"
        "names = ('guided_diffusion', 'generative', 'monai', 'modules', 'diffusers')\n"
        "print(json.dumps(sorted(k for k in sys.modules if k.split('.')[0] in names)))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
    assert (tmp_path / "model" / "unet.safetensors").is_file()


def _original_loop(estimator, x_T, cond, noises, d: DiffusionConfig, monkeypatch):
    """BS-LDM's sampling loop (ldm_eval.py) on diffusers' DDPMScheduler, rebuilt after every step
    with clip_sample_range = start + rate * j; diffusers' per-step noise is replaced by `noises`.
    Returns the soft-tissue latent after every step."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers import DDPMScheduler
        from diffusers.schedulers import scheduling_ddpm
    draws = iter(noises)
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda shape, **kw: next(draws).clone())

    def scheduler(clip_range: float):
        return DDPMScheduler(num_train_timesteps=d.num_train_timesteps, beta_schedule=d.beta_schedule,
                             beta_start=d.beta_start, beta_end=d.beta_end, clip_sample=True,
                             clip_sample_range=clip_range)

    noise_scheduler = scheduler(d.clip_range_start)
    sample = torch.cat([x_T, cond], dim=1)
    states = []
    for j, t in enumerate(noise_scheduler.timesteps):
        residual = estimator(sample, torch.tensor([int(t)]))
        sample = noise_scheduler.step(residual, t, sample).prev_sample
        noise_scheduler = scheduler(d.clip_range_start + d.clip_range_rate * j)
        sample = torch.cat([sample[:, :4], cond], dim=1)
        states.append(sample[:, :4].clone())
    return states


@pytest.fixture
def ddpm_case(gen):
    """A 1000-step problem: latents, per-step noise (8 channels, as diffusers draws it) and a fixed
    stand-in for the U-Net. The stand-in is an ideal denoiser towards a target that leaves the
    early clip ranges (|x0| up to ~2.5 > 1.4), plus an x-dependent term."""
    d = DiffusionConfig()
    schedule = Schedule.from_config(d)
    cond = torch.randn(1, 4, 4, 4, generator=gen)
    x_T = torch.randn(1, 4, 4, 4, generator=gen)
    noises = torch.randn(d.num_train_timesteps, 1, 8, 4, 4, generator=gen)
    weight = torch.randn(8, 8, generator=gen) / 8**0.5
    target = 2.5 * torch.tanh(2.0 * torch.einsum("oc,bchw->bohw", weight[:4, 4:], cond))
    # Clipping is exercised: the target stays outside the widening range for hundreds of steps.
    assert float(target.abs().max()) > d.clip_range_start + d.clip_range_rate * 100
    alpha_bar = schedule.alphas_cumprod.float()

    def estimator(u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = alpha_bar[t].view(-1, 1, 1, 1)
        eps = (u[:, :4] - a.sqrt() * target) / (1 - a).sqrt()
        eps = eps + 0.1 * torch.tanh(torch.einsum("oc,bchw->bohw", weight[:4], u))
        return torch.cat([eps, -eps], dim=1)  # the original U-Net predicts 8 channels

    return d, schedule, estimator, x_T, cond, noises


def test_ddpm_steps_match_diffusers(ddpm_case, monkeypatch, record_property):
    """Every one of the 1000 steps of the DDPM plan (`samplers.sample`), from the original loop's state, against the
    original loop's next state: the sampler's arithmetic per step (clip range, coefficients, noise)."""
    d, schedule, estimator, x_T, cond, noises = ddpm_case
    theirs = _original_loop(estimator, x_T, cond, noises, d, monkeypatch)
    steps = d.num_train_timesteps
    errors = []
    for j in range(steps):
        t = steps - 1 - j
        state = x_T if j == 0 else theirs[j - 1]
        seen = []

        def denoiser(u: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
            seen.append(u[:, :4].clone())
            return estimator(u, ts)[:, :4]

        # One step of the full-length chain from t: run [t, t-1] and read the state the second
        # evaluation receives; the step to t = 0 is the chain's last (no noise) and is returned.
        timesteps = [t, t - 1] if t > 0 else [t]
        out = sample(plan_timesteps("ddpm", schedule, timesteps), denoiser, state, cond,
                     lambda i, j=j: noises[j][:, :4])
        ours = seen[1] if t > 0 else out
        errors.append(rel_error(ours, theirs[j]))
    worst = max(errors)
    record_property("ddpm_step_max_rel_error", worst)
    assert worst <= STEP_TOL, f"step {errors.index(worst)}: {worst:.3g}"


def test_ddpm_trajectory_matches_diffusers(ddpm_case, monkeypatch, record_property):
    """The whole free-running 1000-step trajectory, same noise fed to both, within float32 rounding.

    Our DDPM coefficients replay diffusers' float32 tensor arithmetic, so the chain
    does not accumulate ulp differences.
    """
    d, schedule, estimator, x_T, cond, noises = ddpm_case
    theirs = _original_loop(estimator, x_T, cond, noises, d, monkeypatch)
    ours = []

    def denoiser(u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ours.append(u[:, :4].clone())
        return estimator(u, t)[:, :4]

    steps = d.num_train_timesteps
    final = sample(plan_timesteps("ddpm", schedule, range(steps - 1, -1, -1)), denoiser, x_T, cond,
                   lambda i: noises[i][:, :4])
    ours = ours[1:] + [final]  # the state after step i is what evaluation i + 1 receives
    errors = [rel_error(a, b) for a, b in zip(ours, theirs)]
    worst = max(errors)
    record_property("ddpm_trajectory_max_rel_error", worst)
    assert len(ours) == len(theirs) == steps
    assert worst <= TRAJECTORY_TOL, f"step {errors.index(worst)}: {worst:.3g}"
