"""Correctness before timing: the one place that says how close a timed path must come to the eager
float32 reference of the same stage, and the check every benchmark (run.py, bench_step.py,
gpu_suite.py) runs on a path's first output before it times it.

A path that fails its check is recorded as failed, with the measured error, and is never timed into a
row: a fast path that returns NaN (torch.compile of the bf16 U-Net on the CPU once did, issue 20) or
the wrong numbers measures nothing.

Bounds, by what is compared:

- tensors (latents, noise estimates, sampler states): the relative max error
  max|out - ref| / max|ref| (max-normalised, since a latent has entries near zero where an
  element-wise relative error means nothing). float32 <= 1e-4: a different but exact evaluation
  order (inductor's fused kernels, oneDNN's convolution algorithms, a fused sampler step) stays
  within ~1e-6 here, and an argmin in the VQ quantiser that flips on a near tie moves one latent
  vector by a codebook distance, far above any bound, so it is caught, not hidden. bf16/fp16 <= 3e-2:
  bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 2e-3 per operation); the U-Net in bf16 lands
  at 0.6-0.8 % of float32, so the bound leaves 4x headroom and still rejects a path that is off by
  several per cent.
- end-to-end images: the PSNR against the float32 image, both in [-1, 1] shown as [0, 1]. float32 >=
  60 dB (a same-precision path differs by rounding only); bf16/fp16 >= 30 dB. Measured here (2-core
  EPYC, torch 2.13, DDPM-10): eager bf16 of the random `paper` model at 41 dB, of the `tiny` one at
  56 dB, the trained demo model at 47-54 dB; the same pipeline with another seed at 8.5 dB, an
  all-zero image at 6.6 dB. 30 dB rejects a wrong image with a wide margin and leaves 11 dB for the
  rounding of a reduced precision. Subtler errors are the stage checks' job: the U-Net step and
  the sampler step are checked element-wise above.
- quantised latents (VQ encode) in reduced precision: the share of latent positions whose code
  differs from float32's, <= `engines.tuning.MAX_CODE_FLIPS` (0.1 in bf16/int8). Rounding moves
  a latent vector that sits near the boundary of two codes to the other code, a jump of a whole
  code distance that no element-wise bound can tell from a bug; a layout error changes ~all codes.
  (fp32 keeps the element-wise bound above: there a flip is a finding.)
- int8 (the NNCF int8 IRs, timing rows only): relative max error <= 1e-1, as `engines.tuning`, which
  only catches a broken graph; images >= 20 dB (rounding of 8-bit activations through every step;
  whether int8 images are good enough is the held-out quality gate's verdict,
  benchmarks/int8_gate.py, not this check's).
- paths with no same-noise float32 reference (the original-style loop: diffusers' scheduler draws its
  own noise): finite everywhere only, and the record says so.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from bsldm_fast import metrics
from bsldm_fast.engines import tuning

REL_MAX_ERROR = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 3e-2, "int8": tuning.REL_MAX_ERROR["int8"]}
"""Largest max|out - ref| / max|ref| a tensor output may have, by the precision of the path."""
MAX_CODE_FLIPS = {p: tuning.MAX_CODE_FLIPS[p] for p in ("bf16", "fp16", "int8")}
"""Largest share of changed codes a reduced-precision quantised latent may have (`check_codes`)."""
MIN_PSNR_DB = {"fp32": 60.0, "bf16": 30.0, "fp16": 30.0, "int8": 20.0}
"""Lowest PSNR (dB, against the float32 image) an end-to-end image may have, by precision."""


@dataclass(frozen=True)
class Check:
    """The outcome of one correctness check; `passed` False means the row must not be timed."""

    passed: bool
    metric: str
    """'rel_max_error', 'changed_codes', 'psnr_db' or 'finite'."""
    value: float | None
    bound: float | None
    precision: str
    nonfinite: int = 0
    """Elements of the output that are NaN or infinite."""
    reason: str = ""

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        if self.reason:
            return self.reason
        op = "<=" if self.metric in ("rel_max_error", "changed_codes") else ">="
        return f"{self.metric} {self.value:.3g} {op} {self.bound:g}" if self.bound is not None else self.metric


def _tensor(x) -> torch.Tensor:
    # Pipelines return tensors or (tensor, extra) pairs; the first tensor is the output.
    while isinstance(x, (tuple, list)):
        x = x[0]
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"a check needs a tensor output, got {type(x).__name__}")
    return x.detach().float().cpu()


def _unit_rows(image: torch.Tensor) -> np.ndarray:
    # [-1, 1] shown as [0, 1]. metrics.psnr takes one 2-D image; its MSE is a mean over pixels, so a
    # batch [B, 1, H, W] stacked as rows [B * H, W] gives the batch's PSNR.
    unit = ((image.detach().double().cpu() + 1) / 2).clamp(0, 1)
    return unit.reshape(-1, unit.shape[-1]).numpy()


def psnr(reference: torch.Tensor, test: torch.Tensor) -> float:
    """PSNR in dB of [-1, 1] images shown as [0, 1] (peak 1), at their own size:
    `bsldm_fast.metrics.psnr`, so 100 dB for identical images."""
    return metrics.psnr(_unit_rows(reference), _unit_rows(test), size=None)


def check_finite(output, precision: str, why: str = "no same-noise float32 reference") -> Check:
    """Finite everywhere: the only check for a path without a comparable reference (`why`)."""
    out = _tensor(output)
    bad = int((~torch.isfinite(out)).sum())
    reason = f"{bad} of {out.numel()} outputs not finite" if bad else ""
    return Check(bad == 0, "finite", None, None, precision, bad, reason or f"finite only: {why}")


def _malformed(out: torch.Tensor, ref: torch.Tensor, precision: str, metric: str) -> Check | None:
    """The failed check of an output of the wrong shape or with non-finite values, else None."""
    if out.shape != ref.shape:
        return Check(False, "shape", None, None, precision, 0,
                     f"output shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    bad = int((~torch.isfinite(out)).sum())
    if bad:
        return Check(False, metric, math.nan, None, precision, bad, f"{bad} of {out.numel()} outputs not finite")
    return None


def check_output(output, reference, precision: str, image: bool = False) -> Check:
    """Compare a path's output with the eager float32 output of the same stage on the same input:
    finite everywhere, and within the bound of `precision` (PSNR for end-to-end images)."""
    out, ref = _tensor(output), _tensor(reference)
    broken = _malformed(out, ref, precision, "psnr_db" if image else "rel_max_error")
    if broken is not None:
        return broken
    if not bool(torch.isfinite(ref).all()):
        return Check(False, "reference", None, None, precision, 0, "the float32 reference is not finite")
    if image:
        value, bound = psnr(ref, out), MIN_PSNR_DB[precision]
        passed = value >= bound
        metric = "psnr_db"
    else:
        scale = ref.abs().max().item()
        err = (out - ref).abs().max().item()
        value = err / scale if scale else (0.0 if err == 0 else math.inf)
        bound = REL_MAX_ERROR[precision]
        passed = value <= bound
        metric = "rel_max_error"
    reason = "" if passed else (f"{metric} {value:.3g} beyond the {precision} bound {bound:g}")
    return Check(passed, metric, value, bound, precision, 0, reason)


def check_codes(output, reference, precision: str) -> Check:
    """A quantised latent [B, C, h, w] against the float32 one: finite, and the share of positions
    whose code (the C-vector) differs within `MAX_CODE_FLIPS[precision]`; fp32 (and a precision
    without a flip bound) is held to the element-wise bound of `check_output`."""
    if precision not in MAX_CODE_FLIPS:
        return check_output(output, reference, precision)
    out, ref = _tensor(output), _tensor(reference)
    broken = _malformed(out, ref, precision, "changed_codes")
    if broken is not None:
        return broken
    value, bound = float((out != ref).any(dim=1).float().mean()), MAX_CODE_FLIPS[precision]
    passed = value <= bound
    reason = "" if passed else f"changed_codes {value:.3g} beyond the {precision} bound {bound:g}"
    return Check(passed, "changed_codes", value, bound, precision, 0, reason)


def tolerances() -> dict:
    """The bounds as recorded in every result file."""
    return {"rel_max_error": dict(REL_MAX_ERROR), "min_psnr_db": dict(MIN_PSNR_DB),
            "changed_codes": dict(MAX_CODE_FLIPS),
            "reference": "the same stage, eager, float32, same input (and seeds)"}
