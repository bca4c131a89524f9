"""Quality on held-out real radiographs: models against the identity, at 1024 px, the paper's metrics.

    python benchmarks/real_quality.py --pairs assets/szch_samples --held-out 2 \
        --model new=runs/szch01/model --model demo-2026-11=path/to/old_demo [--steps 10] [--seed 0]

For every held-out pair (pairs/cxr/NAME.png, pairs/soft/NAME.png): BSR, MSE, PSNR and SSIM of
- the identity (the CXR itself as the soft-tissue prediction),
- each model's soft-tissue image (`Suppressor`, the product's path, fp32 unless --precision),
  with the MSE split into the bone region and the rest (`regional_mse`),
- each model's VQGAN round trip of the real CXR and the real soft tissue (PSNR at 1024 px), which
  bounds what its LDM can reach.
A model directory that lists the pair among its training data (`training_data.json`, written by the
data engine's export) is refused for that pair: a held-out number must come from a model that never
saw the pair. Writes RESULTS.json, RESULTS.csv and a figure CXR | each model | real soft tissue.
"""

from __future__ import annotations

import argparse
import dataclasses
import csv
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bsldm_fast import Suppressor, metrics, modeldir, preprocess  # noqa: E402
from bsldm_fast.io import read_image  # noqa: E402
from timing import lscpu  # noqa: E402

from bsldm_fast.training.trainer import trained_real_pairs as trained_on  # noqa: E402


def _unit(path: Path) -> np.ndarray:
    # The metrics' scale (float64, by the stored type), which the published numbers were made with.
    return preprocess.scale_by_dtype(read_image(path))


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    image = torch.from_numpy(image.astype(np.float32))[None, None]
    return preprocess.resize(image, size)[0, 0].numpy()


@torch.no_grad()
def round_trip(model: modeldir.Model, image: np.ndarray) -> np.ndarray:
    """The model's VQGAN reconstruction of a [0, 1] image, back at the image's size."""
    size = model.config.image_size
    x = torch.from_numpy(_resize(image, size))[None, None] * 2 - 1
    y = (model.vqgan.eval()(x).clamp(-1, 1) + 1) / 2
    return np.clip(_resize(y[0, 0].numpy(), image.shape[-1]), 0, 1)


def parse_curve(spec: str):
    """'gamma:G' -> x**G; 'linear:A:B' -> A + B*x (clipped to [0, 1])."""
    kind, *values = spec.split(":")
    numbers = [float(v) for v in values]
    if kind == "gamma" and len(numbers) == 1:
        return lambda x: np.clip(x, 0, 1) ** numbers[0]
    if kind == "linear" and len(numbers) == 2:
        return lambda x: np.clip(numbers[0] + numbers[1] * x, 0, 1)
    raise SystemExit(f"--curve {spec!r}: expected 'gamma:G' or 'linear:A:B'")


BONE_MARGIN = 0.05
"""A pixel is bone when its CXR is this much brighter than its soft tissue, beyond the median
difference of the image (the global display offset between the two): ribs, clavicles, spine."""


def regional_mse(pred: np.ndarray, soft: np.ndarray, cxr: np.ndarray) -> dict[str, float]:
    """MSE where the bones are and everywhere else, at 1024 px, the regions from the real pair: a
    bone suppressor should gain in the first and lose nothing in the second."""
    p, t, c = (metrics.to_metric_size(x) for x in (pred, soft, cxr))
    bone_layer = c - t
    bone = bone_layer - np.median(bone_layer) > BONE_MARGIN
    err = (p - t) ** 2
    return {"mse_bone": float(err[bone].mean()), "mse_rest": float(err[~bone].mean()),
            "bone_share": float(bone.mean())}


def parse_seeds(spec: str) -> list[int]:
    """'1-19' or '1,2,5' -> seeds."""
    seeds: list[int] = []
    for part in filter(None, spec.split(",")):
        low, _, high = part.partition("-")
        seeds += range(int(low), int(high) + 1) if high else [int(low)]
    return seeds


def seed_rows(model: modeldir.Model, name: str, first: dict, cxr: np.ndarray, soft: np.ndarray,
              args) -> list[dict]:
    """One row per extra seed, then their summary with the main seed's row (`first`): how much of
    a score is the luck of one draw."""
    rows = []
    for seed in args.seeds:
        s = Suppressor(model, device="cpu", sampler=args.sampler, steps=args.steps, seed=seed,
                       precision=args.precision, batch_size=1)
        pred = s.suppress_unit([cxr])[0].astype(np.float64)
        rows.append({**{k: first[k] for k in ("pair", "curve", "trained_on")},
                     "method": f"{name}, seed {seed}", "seed": seed,
                     **metrics.evaluate(pred, soft, cxr).as_dict()})
    keys = ("bsr", "mse", "psnr", "ssim")
    table = np.array([[r[k] for k in keys] for r in [first] + rows])
    summary = {**{k: first[k] for k in ("pair", "curve", "trained_on")},
               "method": f"{name}, {len(table)} seeds ({args.seed} and {args.seeds_spec})"}
    summary.update({k: float(v) for k, v in zip(keys, table.mean(axis=0))})
    summary.update({f"min_{k}": float(v) for k, v in zip(keys, table.min(axis=0))})
    summary.update({f"max_{k}": float(v) for k, v in zip(keys, table.max(axis=0))})
    return rows + [summary]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", default=str(ROOT / "assets" / "szch_samples"),
                        help="folder with cxr/NAME.png and soft/NAME.png")
    parser.add_argument("--held-out", required=True, help="comma-separated pair names to score")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                        help="a model directory to score (repeatable); DIR may be 'demo'; "
                             "DIR?normalization=MODE&anchor=MODE&quantize=on|off overrides its input "
                             "normalisation, output anchor and quantize_sample")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the library's)")
    parser.add_argument("--sampler", default="ddpm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", default="", metavar="LIST",
                        help="also score each model with these seeds ('1-19' or '1,2,5'; as stored "
                             "only) and summarise all seeds: mean, min, max")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--curve", action="append", default=[], metavar="SPEC",
                        help="also score under another display curve applied to both the CXR and "
                             "the soft tissue, as another scanner would show them: 'gamma:G' "
                             "(x**G) or 'linear:A:B' (A + B*x); repeatable")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "real-quality"),
                        help="results prefix (.json, .csv and .png are added)")
    args = parser.parse_args(argv)

    args.seeds_spec, args.seeds = args.seeds, parse_seeds(args.seeds)
    pairs = Path(args.pairs)
    names = [n.strip() for n in args.held_out.split(",") if n.strip()]
    models = []
    for spec in args.model:
        name, _, where = spec.partition("=")
        if not where:
            parser.error(f"--model takes NAME=DIR, got {spec!r}")
        where, _, option = where.partition("?")
        model = modeldir.resolve(where)
        for item in filter(None, option.split("&")):  # the same weights, other settings
            key, _, mode = item.partition("=")
            if key == "normalization":
                norm = dataclasses.replace(model.config.input_normalization, mode=mode)
                model = dataclasses.replace(model, config=model.config.replace(input_normalization=norm))
            elif key == "anchor":
                anchor = dataclasses.replace(model.config.output_anchor, mode=mode)
                model = dataclasses.replace(model, config=model.config.replace(output_anchor=anchor))
            elif key == "quantize":
                diffusion = dataclasses.replace(model.config.diffusion, quantize_sample=mode == "on")
                model = dataclasses.replace(model, config=model.config.replace(diffusion=diffusion))
            else:
                parser.error(f"--model {spec!r}: options are 'normalization=MODE', 'anchor=MODE' "
                             "and 'quantize=on|off'")
        seen = trained_on(Path(model.source)) if model.source and Path(model.source).is_dir() else None
        models.append((name, where, model, seen))

    curves = [("as stored", lambda x: x)] + [(spec, parse_curve(spec)) for spec in args.curve]
    rows, figure_rows = [], []
    for pair, (curve_name, curve) in ((p, c) for c in curves for p in names):
        cxr = curve(_unit(pairs / "cxr" / f"{pair}.png"))
        soft = curve(_unit(pairs / "soft" / f"{pair}.png"))
        identity = {**metrics.evaluate(cxr, soft, cxr).as_dict(), **regional_mse(cxr, soft, cxr)}
        first_row = len(rows)
        rows.append({"pair": pair, "curve": curve_name, "method": "identity", "trained_on": "",
                     **identity})
        panels = [cxr]
        for name, where, model, seen in models:
            if seen is not None and pair in seen:
                raise SystemExit(f"{where} was trained on pair {pair}; it cannot be scored on it")
            s = Suppressor(model, device="cpu", sampler=args.sampler, steps=args.steps,
                           seed=args.seed, precision=args.precision, batch_size=1)
            pred = s.suppress_unit([cxr])[0].astype(np.float64)
            scores = {**metrics.evaluate(pred, soft, cxr).as_dict(), **regional_mse(pred, soft, cxr)}
            rows.append({"pair": pair, "curve": curve_name, "method": name,
                         "trained_on": "unknown" if seen is None else ",".join(seen) or "none",
                         **scores,
                         "vq_psnr_cxr": metrics.psnr(cxr, round_trip(model, cxr)),
                         "vq_psnr_soft": metrics.psnr(soft, round_trip(model, soft))})
            panels.append(pred)
            if args.seeds and curve_name == "as stored":
                rows += seed_rows(model, name, rows[-1], cxr, soft, args)
            anchor = model.config.output_anchor
            if anchor.mode == "input":
                # What the anchor alone gives (as if the networks returned the CXR unchanged): the
                # part of a score the networks did not earn.
                shifted = np.clip(cxr + anchor.offset, 0.0, 1.0)
                rows.append({"pair": pair, "curve": curve_name,
                             "method": f"{name}: its anchor alone (CXR {anchor.offset:+g})",
                             "trained_on": rows[-1]["trained_on"],
                             **metrics.evaluate(shifted, soft, cxr).as_dict(),
                             **regional_mse(shifted, soft, cxr)})
        panels.append(soft)
        if curve_name == "as stored":
            figure_rows.append(np.concatenate([_resize(p, 512) for p in panels], axis=1))
        for row in rows[first_row:]:
            print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in row.items() if v is not None), flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"curves": [c for c, _ in curves], "cpu": lscpu().get("model") or platform.processor() or "unknown", "torch": torch.__version__, "pairs": str(pairs), "held_out": names,
              "sampler": args.sampler, "steps": args.steps, "seed": args.seed, "seeds": args.seeds,
              "precision": args.precision,
              "models": {name: {"dir": where, "trained_on": seen} for name, where, _, seen in models},
              "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    keys = sorted({k for r in rows for k in r}, key=lambda k: list(rows[-1]).index(k)
                  if k in rows[-1] else 99)
    with out.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    from PIL import Image

    grid = np.concatenate(figure_rows, axis=0)
    Image.fromarray(np.rint(np.clip(grid, 0, 1) * 255).astype(np.uint8)).save(out.with_suffix(".png"))
    print(f"wrote {out}.json/.csv/.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
