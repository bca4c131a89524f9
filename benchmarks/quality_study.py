"""The few-step quality study: which sampler and how many steps match DDPM-1000.

On held-out phantoms with fixed seeds, every configuration (sampler x steps x dynamic clipping x
offset noise) is scored against the phantom truth (BSR, PSNR, SSIM; the paper's conventions, at
1024^2) and against the DDPM-1000 output of the same phantom and noise seed (PSNR). The recommended
default is the configuration with the fewest U-Net evaluations whose mean PSNR and BSR against the
truth are within 0.3 dB and 0.5 BSR points (0.005) of DDPM-1000's (better counts as within).

    python benchmarks/quality_study.py --model MODEL_DIR [--count 50] [--out benchmarks/results]
    python benchmarks/quality_study.py --model random:tiny --quick --out /tmp/qs    # a smoke run

    # on a small CPU: two shards of the phantoms in parallel, then merge their rows
    python benchmarks/quality_study.py --model demo --grid reduced --count 25 --name a --threads 1 &
    python benchmarks/quality_study.py --model demo --grid reduced --count 25 --first-seed 1000025 \
        --name b --threads 1 &
    wait; python benchmarks/quality_study.py --model demo --merge OUT/quality-a.csv OUT/quality-b.csv \
        --name demo-DATE

Writes, under --out: quality-<name>.csv (one row per configuration and phantom),
quality-<name>-summary.csv (means per configuration) and quality-<name>.png (metric versus U-Net
evaluations); <name> defaults to the model directory's name. Uses the library's public API only
(modeldir, Pipeline.run, metrics, phantoms).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import logging
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from bsldm_fast import metrics, modeldir
from bsldm_fast._files import atomic_write
from bsldm_fast.data import phantom
from bsldm_fast.pipeline import Pipeline
from bsldm_fast.suppressor import resolve_device

logger = logging.getLogger("quality_study")

HELD_OUT_SEED = 1_000_000
"""Phantom seeds of the study start here, far from the training seeds (0, 1, 2, ...)."""
PSNR_TOLERANCE_DB = 0.3
BSR_TOLERANCE = 0.005  # 0.5 percentage points


@dataclass(frozen=True)
class Config:
    """One sampling configuration of the study."""

    sampler: str
    steps: int
    clip: bool
    offset: bool

    @property
    def label(self) -> str:
        return (f"{self.sampler}-{self.steps} clip={'on' if self.clip else 'off'} "
                f"offset={'on' if self.offset else 'off'}")


REFERENCE = Config("ddpm", 1000, clip=True, offset=True)
"""The paper's sampler: 1000 ancestral steps, dynamic clipping, offset-noise start."""


GRIDS = ("full", "reduced", "quick")


def configurations(grid_name: str) -> list[Config]:
    """The reference first, then sampler x steps x clipping x offset-noise combinations.

    'full': DDPM at 10..250 steps, DDIM and DPM-Solver++ at 10/20/50, all four clip/offset variants.
    'reduced' (what a 2-core CPU finishes in well under an hour for 50 phantoms): DDIM and
    DPM-Solver++ at 10/20/50 with all four variants, DDPM at 50 and 100 with clipping and offset
    noise on and off together. 'quick': a smoke run."""
    every = [(clip, offset) for clip in (True, False) for offset in (True, False)]
    if grid_name == "quick":
        plan = [(("ddpm", 20), ("ddim", 10), ("dpmpp", 10)), ((True, True), (False, False))]
        plans = [plan]
    elif grid_name == "reduced":
        plans = [([(n, s) for n in ("ddim", "dpmpp") for s in (10, 20, 50)], every),
                 ([("ddpm", 50), ("ddpm", 100)], [(True, True), (False, False)])]
    elif grid_name == "full":
        plans = [([("ddpm", s) for s in (10, 20, 50, 100, 250)]
                  + [(n, s) for n in ("ddim", "dpmpp") for s in (10, 20, 50)], every)]
    else:
        raise ValueError(f"unknown grid {grid_name!r}; choose one of {GRIDS}")
    configs = [REFERENCE]
    for grid, variants in plans:
        configs += [Config(name, steps, clip, offset) for name, steps in grid
                    for clip, offset in variants]
    return configs


class EvaluationCounter:
    """Counts U-Net forward calls (batches) through a forward hook."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1


def run_config(pipeline: Pipeline, cxr: torch.Tensor, seeds: list[int], config: Config,
               batch_size: int, bar: tqdm) -> tuple[np.ndarray, float, int | None]:
    """Soft-tissue predictions in [0, 1] for every phantom; seconds per image; U-Net evaluations
    per image (None when the pipeline bypasses the nn.Module and the hook cannot see them)."""
    counter = EvaluationCounter(pipeline.unet)
    outputs = []
    start = time.perf_counter()
    batches = 0
    try:
        for b in range(0, len(seeds), batch_size):
            out = pipeline.run(cxr[b : b + batch_size], seeds[b : b + batch_size], config.sampler,
                               config.steps, config.offset)
            outputs.append(((out.float().clamp(-1, 1) + 1) / 2)[:, 0].cpu().numpy())
            batches += 1
            bar.update(1)
    finally:
        counter.handle.remove()
    seconds = (time.perf_counter() - start) / len(seeds)
    nfe = counter.calls // batches if counter.calls else None
    return np.concatenate(outputs), seconds, nfe


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row])
    atomic_write(path, lambda tmp: Path(tmp).write_text(text.getvalue()))


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(finite) if finite else float("nan")


def recommend(summary: list[dict]) -> dict | None:
    """The fewest U-Net evaluations within tolerance of the reference (ties: higher PSNR)."""
    ref = next(s for s in summary if s["config"] == REFERENCE)
    ok = [s for s in summary if s["config"] != REFERENCE and s["nfe"] > 0
          and s["psnr"] >= ref["psnr"] - PSNR_TOLERANCE_DB and s["bsr"] >= ref["bsr"] - BSR_TOLERANCE]
    return min(ok, key=lambda s: (s["nfe"], -s["psnr"])) if ok else None


def _short(config: Config) -> str:
    return (f"{config.sampler}{'' if config.clip else ' noclip'}{' offset' if config.offset else ''}")


def plot(summary: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = next(s for s in summary if s["config"] == REFERENCE)
    identity = next((s for s in summary if s["config"] is None), None)
    panels = [("psnr", "PSNR vs truth (dB)"), ("bsr", "BSR vs truth"), ("ssim", "SSIM vs truth"),
              ("psnr_ref", "PSNR vs DDPM-1000 (dB)")]
    fig, axes = plt.subplots(1, 4, figsize=(17, 5.2))
    markers = {"ddpm": "o", "ddim": "s", "dpmpp": "^"}
    groups: dict[tuple, list[dict]] = {}
    for s in summary:
        c = s["config"]
        if c is None or c == REFERENCE:
            continue
        groups.setdefault((c.sampler, c.clip, c.offset), []).append(s)
    for ax, (key, label) in zip(axes, panels):
        for (sampler, clip, offset), items in sorted(groups.items()):
            items = sorted(items, key=lambda s: s["nfe"])
            ax.plot([s["nfe"] for s in items], [s[key] for s in items], marker=markers.get(sampler, "x"),
                    label=f"{sampler} clip={'on' if clip else 'off'} offset={'on' if offset else 'off'}",
                    alpha=0.85, markersize=4, linestyle="-" if clip else "--")
        if key != "psnr_ref":
            ax.axhline(ref[key], color="k", linewidth=1, label="DDPM-1000")
            if key in ("psnr", "bsr"):
                tol = PSNR_TOLERANCE_DB if key == "psnr" else BSR_TOLERANCE
                ax.axhspan(ref[key] - tol, ref[key] + tol, color="k", alpha=0.08)
            if identity is not None:
                ax.axhline(identity[key], color="r", linewidth=1, linestyle=":", label="identity (CXR)")
        zoom = {"psnr": 2.0, "bsr": 0.1, "ssim": 0.05}.get(key)
        if zoom is not None:
            # Zoom on the reference and the identity: a broken configuration (e.g. no clipping)
            # would otherwise squash every useful curve into one line.
            anchors = [ref[key]] + ([identity[key]] if identity is not None else [])
            values = [s[key] for items in groups.values() for s in items if math.isfinite(s[key])]
            low = min(anchors) - zoom
            high = max(anchors + [v for v in values if v >= low]) + zoom / 4
            ax.set_ylim(low, high)
            below = sorted({_short(s["config"]) for items in groups.values() for s in items
                            if s[key] < low})
            if below:
                lines = [", ".join(below[i : i + 3]) for i in range(0, len(below), 3)]
                ax.text(0.02, 0.02, "below the axis:\n" + "\n".join(lines), fontsize=6,
                        transform=ax.transAxes, va="bottom")
        ax.set_xscale("log")
        ax.set_xlabel("U-Net evaluations per image")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))


ROW_HEADER = ["sampler", "steps", "clip", "offset", "nfe", "seed", "bsr", "mse", "psnr", "ssim",
              "psnr_vs_ddpm1000", "seconds_per_image"]
METRIC_KEYS = ("bsr", "mse", "psnr", "ssim", "psnr_ref")


def _row_config(row: dict) -> Config | None:
    if row["sampler"] == "identity":
        return None
    return Config(row["sampler"], int(row["steps"]), bool(int(row["clip"])), bool(int(row["offset"])))


def summarize(rows: list[list]) -> list[dict]:
    """Means per configuration over the phantoms, in the order the configurations first appear."""
    groups: dict[Config | None, list[dict]] = {}
    for values in rows:
        row = dict(zip(ROW_HEADER, values))
        groups.setdefault(_row_config(row), []).append(row)
    summary = []
    for config, items in groups.items():
        def col(name: str) -> list[float]:
            return [float(r[name]) for r in items if r[name] not in ("", None)]
        summary.append({"config": config, "nfe": int(items[0]["nfe"]), "count": len(items),
                        "seconds": _mean(col("seconds_per_image")),
                        **{k: _mean(col("psnr_vs_ddpm1000" if k == "psnr_ref" else k))
                           for k in METRIC_KEYS}})
    # The identity baseline last, as the sampling run writes it.
    return sorted(summary, key=lambda s: s["config"] is None)


def read_rows(path: Path) -> list[list]:
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        if header != ROW_HEADER:
            raise ValueError(f"{path}: not a quality-study rows file (header {header})")
        return [row for row in reader]


def sample_rows(args: argparse.Namespace, model: modeldir.Model, rows_path: Path) -> list[list]:
    """Sample every configuration on the held-out phantoms and score each output. The rows file is
    rewritten after each configuration, so a run that is cut short leaves what it finished."""
    count = args.count or (3 if args.grid == "quick" else 50)
    size = model.config.image_size
    seeds = [args.first_seed + i for i in range(count)]
    phantoms = [phantom.generate(seed, size) for seed in tqdm(seeds, desc="phantoms", file=sys.stderr)]
    cxr = torch.from_numpy(np.stack([p.cxr for p in phantoms]))[:, None] * 2.0 - 1.0
    device = resolve_device(args.device)
    pipelines = {}
    for clip in (True, False):
        diffusion = dataclasses.replace(model.config.diffusion, clip_sample=clip)
        config = model.config.replace(diffusion=diffusion)
        pipelines[clip] = Pipeline.create(config, model.vqgan, model.unet, device, args.precision)

    configs = configurations(args.grid)
    batches = math.ceil(count / args.batch_size)
    rows: list[list] = []

    def score(config: Config | None, preds: np.ndarray, reference: np.ndarray | None,
              nfe: int, seconds: float) -> None:
        for i, (p, pred, seed) in enumerate(zip(phantoms, preds, seeds)):
            s = metrics.evaluate(pred, p.soft, p.cxr, size=args.metric_size)
            ref_psnr = (float("nan") if reference is None
                        else metrics.psnr(reference[i], pred, size=args.metric_size))
            ident = (["identity", 0, "", ""] if config is None
                     else [config.sampler, config.steps, int(config.clip), int(config.offset)])
            rows.append([*ident, nfe, seed, s.bsr, s.mse, s.psnr, s.ssim, ref_psnr, seconds])

    bar = tqdm(total=len(configs) * batches, desc="sampling", unit="batch", file=sys.stderr)
    reference = None
    for config in configs:
        bar.set_postfix_str(config.label)
        preds, seconds, nfe = run_config(pipelines[config.clip], cxr, seeds, config, args.batch_size, bar)
        if nfe is None:
            nfe = config.steps
            logger.info("U-Net calls not visible to the hook; counting %d evaluations per step", nfe)
        if config == REFERENCE:
            reference = preds
        score(config, preds, reference, nfe, seconds)
        _write_csv(rows_path, ROW_HEADER, rows)
    bar.close()
    score(None, np.stack([p.cxr for p in phantoms]), reference, 0, 0.0)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True,
                        help="model directory, 'demo' (the bundled one), or random:tiny|small")
    parser.add_argument("--count", type=int, default=None, help="held-out phantoms (default 50; 3 with --quick)")
    parser.add_argument("--first-seed", type=int, default=HELD_OUT_SEED,
                        help=f"seed of the first phantom (default {HELD_OUT_SEED})")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                        help="output folder (default benchmarks/results)")
    parser.add_argument("--name", default=None,
                        help="output files are quality-<name>*.csv/.png (default: the model's name)")
    parser.add_argument("--grid", default="full", choices=GRIDS,
                        help="configurations to run (default full; see configurations())")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: --grid quick, 3 phantoms, 6 configurations plus the reference")
    parser.add_argument("--merge", nargs="+", default=None, metavar="ROWS_CSV",
                        help="sample nothing: merge the rows files of earlier runs (e.g. shards of the "
                             "phantoms) and write the summary, plot and recommendation")
    parser.add_argument("--metric-size", type=int, default=metrics.METRIC_SIZE,
                        help="resolution the metrics are computed at (default 1024, the paper's)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is fastest on a busy machine)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing result files")
    args = parser.parse_args(argv)
    if args.quick:
        args.grid = "quick"
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    model = modeldir.resolve(args.model)
    name = args.name or (Path(model.source).name if not model.is_random
                         else model.source.replace(":", "-"))
    out = Path(args.out)
    paths = {k: out / f"quality-{name}{'-quick' if args.grid == 'quick' else ''}{suffix}"
             for k, suffix in (("rows", ".csv"), ("summary", "-summary.csv"), ("plot", ".png"))}
    if args.merge:
        sources = [Path(m).resolve() for m in args.merge]
        paths = {k: p for k, p in paths.items() if not (k == "rows" and p.resolve() in sources)}
    existing = [p for p in paths.values() if p.exists()]
    if existing and not args.overwrite:
        print(f"error: {existing[0]} exists (use --overwrite to replace the results)", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    if model.is_random:
        print(f"WARNING: {args.model} is untrained; the numbers only exercise the study.", file=sys.stderr)

    if args.merge:
        rows = [row for m in args.merge for row in read_rows(Path(m))]
    else:
        rows = sample_rows(args, model, paths["rows"])
    summary = summarize(rows)
    if not summary or summary[0]["config"] != REFERENCE:
        print(f"error: the rows hold no {REFERENCE.label} reference", file=sys.stderr)
        return 2
    seeds = sorted({int(r[5]) for r in rows})
    count = len(seeds)

    if "rows" in paths:
        _write_csv(paths["rows"], ROW_HEADER, rows)
    summary_rows = []
    for s in summary:
        c = s["config"]
        ident = ["identity", 0, "", ""] if c is None else [c.sampler, c.steps, int(c.clip), int(c.offset)]
        summary_rows.append([*ident, s["nfe"], s["count"], s["bsr"], s["mse"], s["psnr"], s["ssim"],
                             s["psnr_ref"], s["seconds"]])
    _write_csv(paths["summary"], ["sampler", "steps", "clip", "offset", "nfe", "phantoms", "bsr", "mse",
                                  "psnr", "ssim", "psnr_vs_ddpm1000", "seconds_per_image"], summary_rows)
    plot(summary, paths["plot"], f"{model.source}: {count} held-out phantoms (seeds {seeds[0]}..{seeds[-1]}), "
         f"metrics at {args.metric_size}px")

    print(f"\n{'configuration':<34}{'NFE':>6}{'BSR':>9}{'PSNR':>8}{'SSIM':>8}{'PSNR/ref':>10}{'s/img':>8}")
    for s in summary:
        label = "identity (CXR as prediction)" if s["config"] is None else s["config"].label
        print(f"{label:<34}{s['nfe']:>6}{s['bsr']:>9.4f}{s['psnr']:>8.2f}{s['ssim']:>8.4f}"
              f"{s['psnr_ref']:>10.2f}{s['seconds']:>8.2f}")
    best = recommend(summary)
    ref = summary[0]
    if best is None:
        print(f"\nrecommended default: none of the faster configurations is within {PSNR_TOLERANCE_DB} dB "
              f"PSNR and {BSR_TOLERANCE * 100:.1f} BSR points of DDPM-1000; keep {REFERENCE.label}")
    else:
        c = best["config"]
        print(f"\nrecommended default: {c.label} ({best['nfe']} U-Net evaluations): PSNR "
              f"{best['psnr']:.2f} dB (DDPM-1000 {ref['psnr']:.2f}), BSR {best['bsr']:.4f} "
              f"(DDPM-1000 {ref['bsr']:.4f})")
    print("results: " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
