"""A data engine: realistic paired radiographs from a handful of real CXR / soft-tissue pairs.

Three real pairs cannot train a bone suppressor by themselves, and phantoms alone teach a model
phantom looks. The engine multiplies the real pairs the way a radiograph forms: every image is
taken back to a line integral of attenuation through one display model `g` (the phantom's
negative-log tone curve), bones are added there, and the sum goes back through `g`.

Sources, each a function of (real pairs, rng) -> (cxr, soft) at 1024 px, float32 in [0, 1]:

- `real`:       a real pair under one shared random warp (affine + smooth elastic field);
- `transplant`: the real soft tissue of one pair + the real bone layer of another (or the same
  pair under another warp), bone = g^-1(cxr) - g^-1(m(soft)), with m the soft -> CXR tone map
  fitted on the training pairs;
- `phantom`:    a real soft-tissue image + the bone line integral of a procedural phantom
  (ribs, clavicles, spine, scapulae), scaled and warped.

Then shared "acquisition" changes, identical for both images of a pair: wires, tubes, markers and
text (radio-opaque, so in both images), collimation, blur, quantum noise, a random display gamma,
and the output resolution.

    python -m bsldm_fast.data.engine --pairs DIR --train 0,1 --out OUT --count N [--size S]

writes the training layout OUT/CXR/NAME.png + OUT/BS/NAME.png (16-bit) and OUT/engine.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import phantom

SIZE = 1024
"""Working resolution of the engine (the real pairs' native size)."""
TONE = 1.4
"""Tone constant of the display model g (the middle of the phantoms' range)."""
_L_MAX = 3.6
_GAMMA = 1.3


def to_line_integral(display: np.ndarray, tone: float = TONE) -> np.ndarray:
    """g^-1: display value in [0, 1] -> line integral of attenuation in [0, 3.6]."""
    d = np.clip(display, 0.0, 1.0) ** (1.0 / _GAMMA)
    return -tone * np.log1p(-d * (1.0 - math.exp(-_L_MAX / tone)) * (1 - 1e-7))


def to_display(line_integral: np.ndarray, tone: float = TONE) -> np.ndarray:
    """g: line integral -> display value in [0, 1] (the phantom's negative-log tone curve)."""
    d = (1.0 - np.exp(-np.maximum(line_integral, 0.0) / tone)) / (1.0 - math.exp(-_L_MAX / tone))
    return np.clip(d, 0.0, 1.0) ** _GAMMA


@dataclass(frozen=True)
class ToneMap:
    """A monotone display-to-display map fitted by quantile matching (soft tissue -> CXR)."""

    source: tuple[float, ...]
    target: tuple[float, ...]

    @classmethod
    def fit(cls, sources: list[np.ndarray], targets: list[np.ndarray], knots: int = 257) -> ToneMap:
        q = np.linspace(0.0, 1.0, knots)
        src = np.mean([np.quantile(s, q) for s in sources], axis=0)
        tgt = np.mean([np.quantile(t, q) for t in targets], axis=0)
        # Strictly increasing knots keep np.interp well defined on flat histogram stretches.
        src = np.maximum.accumulate(src + np.arange(knots) * 1e-9)
        return cls(tuple(map(float, src)), tuple(map(float, tgt)))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return np.interp(image, self.source, self.target)


@dataclass(frozen=True)
class EngineConfig:
    """Mixture and ranges of the engine; every draw is keyed by (seed, index)."""

    p_real: float = 0.3
    p_transplant: float = 0.4
    p_phantom: float = 0.3
    max_rotate: float = 6.0
    """Largest rotation in degrees."""
    max_scale: float = 0.12
    """Largest relative zoom (both ways)."""
    max_translate: float = 0.06
    """Largest shift as a fraction of the image size."""
    elastic: float = 0.015
    """Amplitude of the smooth displacement field (fraction of the image size)."""
    bone_scale: tuple[float, float] = (0.7, 1.3)
    """Range of the factor on a transplanted or phantom bone layer."""
    p_devices: float = 0.3
    """Share of pairs with wires, tubes, markers or text."""
    p_collimation: float = 0.15
    p_gamma: float = 0.3
    """Share of pairs shown through a random display gamma (the same for CXR and soft tissue)."""
    max_gamma: float = 1.25
    p_blur: float = 0.3
    p_noise: float = 0.3


def load_pairs(folder: str | Path, names: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Real pairs folder/cxr/NAME.* + folder/soft/NAME.* as float64 [0, 1] at 1024 px, read and
    resized as training and inference read them (`preprocess`)."""
    from ..preprocess import read_at_size

    root = Path(folder)
    pairs = []
    for name in names:
        images = []
        for kind in ("cxr", "soft"):
            matches = sorted((root / kind).glob(f"{name}.*"))
            if not matches:
                raise FileNotFoundError(f"{root / kind}: no image named {name}.*")
            images.append(read_at_size(matches[0], SIZE)[0, 0].numpy().astype(np.float64))
        pairs.append((images[0], images[1]))
    return pairs


def bone_layer(cxr: np.ndarray, soft: np.ndarray, tone_map: ToneMap) -> np.ndarray:
    """The bone line integral of a real pair: g^-1(cxr) - g^-1(m(soft))."""
    return to_line_integral(cxr) - to_line_integral(tone_map(soft))


def _grid(rng: np.random.Generator, config: EngineConfig, size: int) -> torch.Tensor:
    """A sampling grid: random affine plus a smooth elastic displacement, in [-1, 1] coordinates."""
    angle = math.radians(rng.uniform(-config.max_rotate, config.max_rotate))
    scale = math.exp(rng.uniform(-config.max_scale, config.max_scale))
    tx, ty = rng.uniform(-config.max_translate, config.max_translate, 2) * 2
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    theta = torch.tensor([[[cos, -sin, tx], [sin, cos, ty]]], dtype=torch.float32)
    grid = F.affine_grid(theta, [1, 1, size, size], align_corners=False)
    coarse = torch.from_numpy(rng.standard_normal((1, 2, 6, 6)).astype(np.float32))
    field = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return grid + 2 * config.elastic * field.permute(0, 2, 3, 1)


def _warp(images: list[np.ndarray], grid: torch.Tensor) -> list[np.ndarray]:
    stack = torch.from_numpy(np.stack(images).astype(np.float32))[:, None]
    out = F.grid_sample(stack, grid.expand(len(images), -1, -1, -1), mode="bilinear",
                        padding_mode="border", align_corners=False)
    return [o[0].numpy().astype(np.float64) for o in out]


def phantom_bone(seed: int, size: int = SIZE) -> np.ndarray:
    """The bone line integral of procedural phantom `seed` (ribs, clavicles, spine, scapulae, ...)."""
    p = phantom.generate(seed, size, nodules=False, noise=False)
    return to_line_integral(p.cxr) - to_line_integral(p.soft)


def _devices(rng: np.random.Generator, size: int) -> np.ndarray:
    """Radio-opaque line integrals: ECG wires, a tube, ring markers and lead letters."""
    y, x = np.mgrid[0:size, 0:size] / size
    out = np.zeros((size, size))
    for _ in range(rng.integers(1, 4)):  # wires and tubes: smooth random curves
        t = np.linspace(0, 1, 400)
        c = rng.uniform(0.1, 0.9, (2, 4))
        px = c[0, 0] + (c[0, 1] - c[0, 0]) * t + 0.08 * np.sin(2 * math.pi * (c[0, 2] + t * c[0, 3]))
        py = c[1, 0] + (c[1, 1] - c[1, 0]) * t + 0.08 * np.sin(2 * math.pi * (c[1, 2] + t * c[1, 3]))
        width = rng.uniform(0.0008, 0.004)
        strength = rng.uniform(0.2, 1.0)
        idx = (np.clip(py, 0, 0.999) * size).astype(int), (np.clip(px, 0, 0.999) * size).astype(int)
        track = np.zeros((size, size))
        track[idx] = 1.0
        track = _blur(track, width * size)
        out += strength * track / max(track.max(), 1e-9)
    for _ in range(rng.integers(0, 3)):  # ring markers (ECG electrodes)
        cx, cy, r = rng.uniform(0.15, 0.85), rng.uniform(0.15, 0.85), rng.uniform(0.006, 0.015)
        d = np.hypot(x - cx, y - cy)
        out += 0.8 * np.exp(-((d - r) / 0.002) ** 2)
    if rng.random() < 0.5:  # a lead side marker: a bright block with a letter-like hole pattern
        cx, cy = rng.uniform(0.05, 0.25) + rng.integers(0, 2) * 0.7, rng.uniform(0.03, 0.2)
        block = (np.abs(x - cx) < 0.02) & (np.abs(y - cy) < 0.025)
        holes = (np.abs(x - cx) < 0.008) & (np.abs(y - cy + 0.005) < 0.015)
        out += 2.0 * (block & ~holes)
    return out


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    if sigma < 0.3:
        return image
    return phantom._blur(image.astype(np.float32), sigma).astype(np.float64)


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    # The one resize, so engine images shrink exactly as training and inference do.
    from ..preprocess import resize

    return resize(torch.from_numpy(image.astype(np.float32))[None, None], size)[0, 0].numpy()


class Engine:
    """Draws realistic pairs from real training pairs; `pair(index)` is a pure function of (seed, index)."""

    def __init__(self, pairs: list[tuple[np.ndarray, np.ndarray]], config: EngineConfig = EngineConfig(),
                 seed: int = 0, size: int = SIZE):
        if not pairs:
            raise ValueError("the engine needs at least one real pair")
        # Everything is drawn at the output size: warping at 1024 px and shrinking after costs 4x.
        self.size = size
        self.pairs = [(_resize(c, size).astype(np.float64), _resize(s, size).astype(np.float64))
                      for c, s in pairs]
        self.config = config
        self.seed = seed
        self.tone_map = ToneMap.fit([s for _, s in self.pairs], [c for c, _ in self.pairs])
        self.bones = [bone_layer(c, s, self.tone_map) for c, s in self.pairs]

    def source(self, index: int) -> str:
        rng = np.random.default_rng([self.seed, index, 0])
        c = self.config
        u = rng.random() * (c.p_real + c.p_transplant + c.p_phantom)
        return "real" if u < c.p_real else "transplant" if u < c.p_real + c.p_transplant else "phantom"

    def pair(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        """(cxr, soft, source name) at the engine's size, float32 in [0, 1]."""
        c = self.config
        size = self.size
        kind = self.source(index)
        rng = np.random.default_rng([self.seed, index, 1])
        j = int(rng.integers(len(self.pairs)))
        cxr_j, soft_j = self.pairs[j]
        if kind == "real":
            cxr, soft = _warp([cxr_j, soft_j], _grid(rng, c, size))
            soft_l = to_line_integral(self.tone_map(soft))
            bone_l = to_line_integral(cxr) - soft_l
        else:
            (soft,) = _warp([soft_j], _grid(rng, c, size))
            soft_l = to_line_integral(self.tone_map(soft))
            if kind == "transplant":
                (bone_l,) = _warp([self.bones[int(rng.integers(len(self.pairs)))]], _grid(rng, c, size))
            else:
                (bone_l,) = _warp([phantom_bone(int(rng.integers(2**31)), size)], _grid(rng, c, size))
            bone_l = bone_l * rng.uniform(*c.bone_scale)
        # Acquisition, shared by both images. Radio-opaque devices show in both (dual-energy
        # subtraction cannot remove metal) and quantum noise comes from the one exposure; the soft
        # image keeps its own display and takes them as a display-domain change.
        extra = _devices(rng, size) if rng.random() < c.p_devices else 0.0
        if rng.random() < c.p_noise:
            extra = extra + rng.standard_normal((size, size)) * rng.uniform(0.005, 0.02)
        cxr = to_display(soft_l + bone_l + extra)
        soft_out = soft + to_display(soft_l + extra) - to_display(soft_l)
        if rng.random() < c.p_blur:
            sigma = rng.uniform(0.5, 2.0) * size / SIZE
            cxr, soft_out = _blur(cxr, sigma), _blur(soft_out, sigma)
        if rng.random() < c.p_collimation:
            mask = np.ones((size, size))
            m = rng.uniform(0.02, 0.1, 4)
            e = (m * size).astype(int)
            mask[: e[0]] = mask[-e[1]:] = 0
            mask[:, : e[2]] = mask[:, -e[3]:] = 0
            mask = _blur(mask, 3.0 * size / SIZE)
            level = rng.uniform(0.0, 0.1)
            cxr = cxr * mask + level * (1 - mask)
            soft_out = soft_out * mask + level * (1 - mask)
        if rng.random() < c.p_gamma:
            gamma = math.exp(rng.uniform(-1, 1) * math.log(c.max_gamma))
            cxr, soft_out = np.clip(cxr, 0, 1) ** gamma, np.clip(soft_out, 0, 1) ** gamma
        cxr, soft_out = np.clip(cxr, 0, 1), np.clip(soft_out, 0, 1)
        return cxr.astype(np.float32), soft_out.astype(np.float32), kind


def write_dataset(engine: Engine, out_dir: str | Path, count: int, start: int = 0,
                  progress: bool = True) -> dict[str, int]:
    """Write pairs start..start+count-1 as OUT/CXR/NAME.png + OUT/BS/NAME.png (16-bit).

    Existing pairs are kept (a rerun completes an interrupted dataset); returns the count per source.
    """
    from tqdm import tqdm

    from ..io import write_image

    out = Path(out_dir)
    counts: dict[str, int] = {}
    for index in tqdm(range(start, start + count), desc="pairs", unit="pair", disable=not progress,
                      file=sys.stderr):
        name = f"{index:06d}.png"
        kind = engine.source(index)
        counts[kind] = counts.get(kind, 0) + 1
        if (out / "CXR" / name).exists() and (out / "BS" / name).exists():
            continue
        cxr, soft, _ = engine.pair(index)
        # BS first: a pair counts as present only once its CXR exists.
        write_image(out / "BS" / name, phantom.to_integer(soft, 16), overwrite=True)
        write_image(out / "CXR" / name, phantom.to_integer(cxr, 16), overwrite=True)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bsldm_fast.data.engine",
        description="Write realistic training pairs made from real CXR / soft-tissue pairs "
                    "(real pairs warped, real bones transplanted, phantom bones on real soft tissue).")
    parser.add_argument("--pairs", required=True, help="folder with cxr/NAME.png and soft/NAME.png")
    parser.add_argument("--train", required=True,
                        help="comma-separated names of the real pairs the engine may use, e.g. 0,1")
    parser.add_argument("--out", required=True, help="output folder (CXR/ and BS/ are created)")
    parser.add_argument("--count", type=int, required=True, help="number of pairs to write")
    parser.add_argument("--size", type=int, default=512, help="output side in pixels (default 512)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every draw (default 0)")
    parser.add_argument("--start", type=int, default=0, help="index of the first pair (default 0)")
    args = parser.parse_args(argv)
    if args.count < 1 or not 16 <= args.size <= SIZE:
        parser.error(f"--count must be >= 1 and --size in [16, {SIZE}]")
    names = [n.strip() for n in args.train.split(",") if n.strip()]
    engine = Engine(load_pairs(args.pairs, names), EngineConfig(), seed=args.seed, size=args.size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    counts = write_dataset(engine, out, args.count, start=args.start)
    record = {"pairs": str(args.pairs), "train": names, "count": args.count, "start": args.start,
              "size": args.size, "seed": args.seed, "sources": counts,
              "config": asdict(engine.config)}
    (out / "engine.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"{args.count} pairs in {out} ({counts})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
