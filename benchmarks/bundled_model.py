"""End-to-end speed of the bundled model on the CPU, checked before it is timed.

    python benchmarks/bundled_model.py [--model demo] [--threads N] [--repeats 3] [--k 20]

Rows (one image at a time, the bundled SZCH samples as input, 1024 px uint8 in and out):
- original-style: the original BS-LDM loop (fp32 eager, diffusers' DDPMScheduler rebuilt every
  step, 1000 steps), `benchmarks/original_style.py`; k steps are timed and the loop is scaled to
  1000 (the row says so). The baseline of every ratio.
- Suppressor fp32 / bf16 with the default sampler (DDPM, 10 steps): what `bsldm-fast suppress`
  runs, file decoding aside: normalisation, resize, encode, sample, decode, resize back.
Before a product row is timed, its pipeline's output on the first sample is compared with the plain
PyTorch reference (fp32, unfused reference sampler, same seed and noise) with the project's one set
of bounds (`benchmarks/checks.py`: PSNR of the image); a row that fails is recorded as failed, not
timed.
Writes benchmarks/results/bundled-model-<machine>-<date>.json with `lscpu`'s model and flags.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bsldm_fast import Suppressor, modeldir, preprocess  # noqa: E402
from bsldm_fast.io import read_image  # noqa: E402
from bsldm_fast.pipeline import Pipeline  # noqa: E402
from original_style import OriginalStyle  # noqa: E402
from checks import check_output, tolerances  # noqa: E402
from timing import lscpu, machine, machine_slug, measure, write_new  # noqa: E402


def check(model: modeldir.Model, suppressor: Suppressor, x: torch.Tensor, seed: int) -> dict:
    """The suppressor's pipeline vs the fp32 reference pipeline on one model-size input."""
    reference = Pipeline.create(model.config, model.vqgan, model.unet, "cpu", "fp32", "reference").run(x, [seed])
    product = suppressor.pipeline.run(x, [seed])
    return check_output(product, reference, suppressor.pipeline.precision, image=True).as_dict()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--k", type=int, default=20, help="original-style steps timed (of 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = modeldir.resolve(args.model)
    samples = sorted((ROOT / "assets" / "szch_samples" / "cxr").glob("*.png"))
    images = [read_image(p) for p in samples]
    cpu = lscpu()
    print(f"CPU: {cpu.get('model', '?')}\nflags: {cpu.get('flags', '?')}\ntorch threads: "
          f"{torch.get_num_threads()}", flush=True)
    rows = []

    # The baseline: the original loop, k of its 1000 steps timed, then scaled.
    loop = OriginalStyle(model.vqgan, model.unet, model.config.diffusion)
    x = preprocess.model_input(preprocess.pixels_to_unit(images[0])[0], model.config).tensor
    runs = [loop.run(x, max_steps=args.k)[1] for _ in range(2)]
    estimate = min(r.estimate() for r in runs)
    rows.append({"row": "original-style fp32 DDPM-1000", "seconds_per_image": estimate,
                 "note": f"{args.k} of {runs[0].total_steps} steps timed, 2 runs, scaled"})
    print(f"{rows[-1]['row']:40s} {estimate:8.2f} s/image (scaled from {args.k} steps)", flush=True)

    for precision in ("fp32", "bf16"):
        name = f"Suppressor {precision} DDPM-10 (default sampler)"
        s = Suppressor(model, device="cpu", precision=precision, seed=args.seed, batch_size=1)
        result = check(model, s, x, args.seed)
        if not result["passed"]:  # never timed, never in a ratio
            rows.append({"row": name, "failed": result})
            print(f"{name:40s} FAILED its check: {result}", flush=True)
            continue
        s(images[0])  # warm-up (first-call allocations, kernel selection)
        timing = measure(lambda: [s(image) for image in images], warmup=0, repeats=args.repeats)
        per_image = timing.median / len(images)
        rows.append({"row": name, "seconds_per_image": per_image, "check": result,
                     "speedup_vs_original_style": estimate / per_image,
                     "repeats_s": [t / len(images) for t in timing.times]})
        print(f"{name:40s} {per_image:8.2f} s/image  {estimate / per_image:7.0f}x  "
              f"(check: {result['value']:.1f} dB >= {result['bound']:g})", flush=True)

    info = machine()
    record = {"machine": info, "lscpu": cpu, "tolerances": tolerances(), "model": str(model.source), "config": model.config.to_dict(),
              "images": [p.name for p in samples], "rows": rows}
    path = write_new(Path(args.out_dir), f"bundled-model-{machine_slug(info)}-{time.strftime('%Y-%m-%d')}",
                     record)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
