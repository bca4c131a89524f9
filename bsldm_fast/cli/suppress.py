"""`bsldm-fast suppress`: write a soft-tissue image for every input radiograph."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from tqdm import tqdm

from ..diffusion import SAMPLERS
from ..io import ImageError, find_images, read_image, write_image
from ..pipeline import DEFAULT_STEPS, PRECISIONS

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "random:tiny"

RANDOM_MODEL_WARNING = (
    "WARNING: using an untrained, randomly initialised '{name}' model ({spec}). Its output is NOT "
    "a bone-suppressed image: it only exercises the pipeline end to end. Pass --model DIR for a "
    "trained model."
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "suppress",
        help="bone-suppress chest X-rays (PNG/JPEG, 8/16-bit; files or folders)",
        description="Write a soft-tissue (bone-suppressed) image for every input radiograph. Folders "
        "are searched recursively; each result keeps its relative path, name, format and bit depth "
        "under OUTDIR. Existing outputs are never overwritten unless --overwrite is given.",
    )
    p.add_argument("inputs", nargs="+", metavar="IN", help="image files or folders")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="model directory (config.json + safetensors), or random:tiny|small|paper "
                        f"for an untrained model (default: {DEFAULT_MODEL})")
    p.add_argument("--sampler", default="dpmpp", choices=SAMPLERS,
                   help="ddpm (the paper's ancestral sampler), ddim, or dpmpp (DPM-Solver++(2M)); "
                        "default: dpmpp")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps (default: " +
                        ", ".join(f"{k} {v}" for k, v in DEFAULT_STEPS.items()) + ")")
    p.add_argument("--seed", type=int, default=0, help="noise seed; the same seed gives the same image")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    p.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS),
                   help="U-Net precision (default fp32)")
    p.add_argument("--offset-noise", action="store_true",
                   help="start from offset noise (eps + 0.1 eps_c, as in training) instead of plain "
                        "Gaussian noise, as the original sampler does")
    p.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..modeldir import ModelDirError
    from ..suppressor import Suppressor

    out_dir = Path(args.output)
    try:
        jobs = find_images(args.inputs)
    except ImageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not jobs:
        print("error: no PNG or JPEG images found in the inputs", file=sys.stderr)
        return 2
    sources = {job.source.resolve() for job in jobs}
    try:
        suppressor = Suppressor.from_pretrained(
            args.model, device=args.device, sampler=args.sampler, steps=args.steps, seed=args.seed,
            precision=args.precision, offset_noise=args.offset_noise,
        )
    except (ModelDirError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if suppressor.is_random:
        print(RANDOM_MODEL_WARNING.format(name=suppressor.config.name, spec=args.model), file=sys.stderr)
    print(
        f"model {suppressor.source} ({suppressor.config.name}, {suppressor.config.image_size} px), "
        f"{suppressor.sampler} x {suppressor.steps} steps, {suppressor.device}, {args.precision}",
        file=sys.stderr,
    )

    failures: list[tuple[Path, str]] = []
    written = 0
    start = time.perf_counter()
    bar = tqdm(jobs, unit="img", desc="suppress", file=sys.stderr)
    for job in bar:
        target = out_dir / job.relative
        try:
            if target.resolve() in sources:
                raise ImageError(f"{target}: output would overwrite an input; choose another -o")
            if target.exists() and not args.overwrite:
                raise ImageError(f"{target}: output exists (use --overwrite to replace it)")
            image = read_image(job.source)
            write_image(target, suppressor(image), overwrite=args.overwrite)
            written += 1
        except (ImageError, ValueError, OSError) as error:
            failures.append((job.source, str(error)))
            bar.write(f"failed: {job.source}: {error}", file=sys.stderr)
    elapsed = time.perf_counter() - start
    print(f"wrote {written} of {len(jobs)} images to {out_dir} in {elapsed:.1f} s", file=sys.stderr)
    if failures:
        print(f"{len(failures)} failed:", file=sys.stderr)
        for source, reason in failures:
            print(f"  {source}: {reason}", file=sys.stderr)
        return 1
    return 0
