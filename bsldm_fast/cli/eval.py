"""`bsldm-fast eval`: the BS-LDM metrics of predicted soft-tissue images against their targets."""

from __future__ import annotations

import argparse
import csv
import io
import math
import statistics
import sys
from pathlib import Path

from tqdm import tqdm

from .._files import atomic_write
from ..io import ImageError, find_images, read_image

COLUMNS = ("bsr", "mse", "psnr", "ssim", "lpips")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="score predicted soft-tissue images: BSR, MSE, PSNR, SSIM, LPIPS",
        description="Score every image under --pred against the file with the same relative path "
        "under --target (and --cxr, for BSR), as the BS-LDM paper does: images scaled to [0, 1] and "
        "resized to 1024 x 1024. Writes a per-image CSV and prints a summary table. LPIPS is "
        "computed only when the 'lpips' package and its AlexNet weights are present locally.",
    )
    p.add_argument("--pred", required=True, metavar="DIR", help="predicted soft-tissue images")
    p.add_argument("--target", required=True, metavar="DIR", help="true soft-tissue images")
    p.add_argument("--cxr", metavar="DIR", help="the input radiographs (needed for BSR)")
    p.add_argument("--csv", default="metrics.csv", metavar="FILE",
                   help="per-image results (default: metrics.csv)")
    p.add_argument("--no-lpips", action="store_true", help="skip LPIPS even where it could run")
    p.add_argument("--overwrite", action="store_true", help="replace an existing CSV")
    p.set_defaults(func=run)


def _pairs(pred_dir: Path, target_dir: Path, cxr_dir: Path | None):
    """(relative path, pred, target, cxr) for every prediction; an error names unpaired files."""
    for name, folder in (("--pred", pred_dir), ("--target", target_dir), ("--cxr", cxr_dir)):
        if folder is not None and not folder.is_dir():
            raise ImageError(f"{name} {folder}: no such folder")
    jobs = find_images([pred_dir])
    if not jobs:
        raise ImageError(f"--pred {pred_dir}: no PNG or JPEG images found")
    missing = []
    pairs = []
    for job in jobs:
        target = target_dir / job.relative
        cxr = None if cxr_dir is None else cxr_dir / job.relative
        for path in (target, cxr):
            if path is not None and not path.is_file():
                missing.append(path)
        pairs.append((job.relative, job.source, target, cxr))
    if missing:
        shown = "\n  ".join(map(str, missing[:10]))
        more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise ImageError(f"{len(missing)} prediction(s) have no counterpart with the same relative "
                         f"path:\n  {shown}{more}")
    return pairs


def _summary(rows: list[dict], columns: list[str]) -> str:
    lines = [f"{'metric':<8}{'mean':>12}{'std':>12}{'min':>12}{'max':>12}"]
    for column in columns:
        values = [row[column] for row in rows if row[column] is not None and not math.isnan(row[column])]
        if not values:
            continue
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(f"{column:<8}{statistics.fmean(values):>12.6g}{std:>12.4g}"
                     f"{min(values):>12.6g}{max(values):>12.6g}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..metrics import evaluate, load_lpips

    csv_path = Path(args.csv)
    if csv_path.exists() and not args.overwrite:
        print(f"error: {csv_path} exists (use --overwrite to replace it)", file=sys.stderr)
        return 2
    try:
        pairs = _pairs(Path(args.pred), Path(args.target), Path(args.cxr) if args.cxr else None)
    except ImageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    lpips_model, reason = (None, "LPIPS skipped (--no-lpips)") if args.no_lpips else load_lpips()
    if reason:
        print(reason, file=sys.stderr)
    if args.cxr is None:
        print("BSR skipped: it needs the input radiographs (--cxr DIR)", file=sys.stderr)
    columns = [c for c in COLUMNS if not (c == "bsr" and args.cxr is None)
               and not (c == "lpips" and lpips_model is None)]

    rows = []
    try:
        for relative, pred, target, cxr in tqdm(pairs, unit="img", desc="eval", file=sys.stderr):
            scores = evaluate(read_image(pred), read_image(target),
                              None if cxr is None else read_image(cxr), lpips_model)
            rows.append({"image": relative.as_posix(), **scores.as_dict()})
    except (ImageError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["image", *columns])
    for row in rows:
        writer.writerow([row["image"], *(f"{row[c]:.8g}" for c in columns)])
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(csv_path, lambda tmp: Path(tmp).write_text(text.getvalue()))
    print(f"{len(rows)} images; per-image results in {csv_path}")
    print(_summary(rows, columns))
    return 0
