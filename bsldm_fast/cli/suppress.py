"""`bsldm-fast suppress`: write a soft-tissue image for every input radiograph."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..diffusion import SAMPLERS
from ..engines.runners import BACKENDS
from ..io import ImageError, find_images
from ..io.batch import REPORT_NAME, BatchInterrupted, BatchOptions, prepare_output, run_batch
from ..io.ranks import agree, broadcast
from ..io.formats import MAX_PIXELS, MAX_SIDE, MIN_SIDE
from ..modeldir import DEMO_DIR
from ..pipeline import DEFAULT_SAMPLER, DEFAULT_STEPS, PRECISIONS

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "demo"

DEMO_MODEL_NOTE = (
    "NOTE: the bundled demo model (512 px) was trained from two real SZCH-X-Rays pairs multiplied "
    "by the data engine, on a CPU. It suppresses bones on real radiographs but is NOT for clinical "
    "use. See bsldm_fast/assets/demo_model/README.md for what it was trained on and how well it does."
)

RANDOM_MODEL_WARNING = (
    "WARNING: using an untrained, randomly initialised '{name}' model ({spec}). Its output is NOT "
    "a bone-suppressed image: it only exercises the pipeline end to end. Pass --model DIR for a "
    "trained model."
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "suppress",
        help="bone-suppress chest X-rays (DICOM, PNG, JPEG, TIFF; files or folders)",
        description="Write a soft-tissue (bone-suppressed) image for every input radiograph. Folders "
        "are searched recursively; each result keeps its relative path, name, format, bit depth, "
        "size and orientation under OUTDIR (a DICOM result is a new derived instance in a new "
        "series). Outputs are written atomically; inputs are never modified; existing outputs are "
        "kept unless --overwrite. OUTDIR is checked and locked before the model loads: a second "
        "run into the same OUTDIR is refused. A file that fails is reported and skipped; the exit "
        f"code is 1 if any failed, 2 if nothing could start, 130 on Ctrl-C, and OUTDIR/{REPORT_NAME} "
        f"lists every input with its outcome. Images must be {MIN_SIDE} to {MAX_SIDE} px a side "
        f"and at most {MAX_PIXELS / 1e6:.1f} Mpx. Under torchrun (`torchrun --nproc_per_node N "
        "-m bsldm_fast.cli suppress ...`) the inputs are split between the ranks, each on its own "
        "device (GPU LOCAL_RANK), and rank 0 writes the one report.",
    )
    p.add_argument("inputs", nargs="+", metavar="IN", help="image files or folders")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="model directory (config.json + safetensors); 'demo', the bundled model "
                        "(512 px, trained from two real pairs with the data engine; not for "
                        "clinical use); or random:tiny|small|paper for an untrained model "
                        f"(default: {DEFAULT_MODEL})")
    p.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=SAMPLERS,
                   help="ddpm (the paper's ancestral sampler; with --steps 1000 the original loop), "
                        "ddim, or dpmpp (DPM-Solver++(2M)); default: " + DEFAULT_SAMPLER)
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps (default: " +
                        ", ".join(f"{k} {v}" for k, v in DEFAULT_STEPS.items()) + ")")
    p.add_argument("--seed", type=int, default=0, help="noise seed; the same seed gives the same image")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    p.add_argument("--precision", default="fp32", choices=[*sorted(PRECISIONS), "int8"],
                   help="precision of the U-Net and the VQGAN's encoder and decoder (default fp32); "
                        "the codebook search and the sampler state stay float32. int8 (CPU; "
                        "--backend openvino or auto): the model's int8 networks that passed its "
                        "quality gate (benchmarks/int8_gate.py), bf16 for the rest, with a warning "
                        "saying why")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="what runs the networks: tensorrt (engines from `bsldm-fast build-engine`; "
                        "CUDA), torch-compile, torch, or openvino (CPU; the `openvino` extra); on "
                        "CUDA in a CUDA-graph pipeline. auto (default): on CUDA TensorRT when it and "
                        "the engines are there, else torch-compile; on the CPU each network on its "
                        "fastest runner measured by `bsldm-fast tune MODEL`, else torch")
    p.add_argument("--offset-noise", action="store_true",
                   help="start from offset noise (eps + 0.1 eps_c, as in training) instead of plain "
                        "Gaussian noise, as the original sampler does; only for ddpm (the quality "
                        "study measured ~22 dB PSNR with ddim/dpmpp started this way)")
    existing = p.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true",
                          help="replace outputs that already exist (never inputs)")
    existing.add_argument("--skip-existing", action="store_true",
                          help="skip inputs whose outputs already exist (resume a run)")
    p.add_argument("--bone", action="store_true",
                   help="also write the bone image (CXR minus soft tissue) as NAME.bone.EXT")
    p.add_argument("--side-by-side", action="store_true",
                   help="also write NAME.review.png: CXR | soft tissue [| bone], 8-bit, for review")
    p.add_argument("--batch-size", type=int, default=4, help="images per model batch (default 4)")
    p.add_argument("--report", default=None, metavar="PATH",
                   help=f"where to write the JSON report (default: OUTDIR/{REPORT_NAME}); never an "
                        "input or inside an input folder; an existing file other than an earlier "
                        "report is replaced only with --overwrite")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..distributed import join, leave

    try:
        group = join()  # a plain run: SOLO, and nothing distributed happens
    except (RuntimeError, ValueError) as error:
        print(f"error: cannot join the torchrun job: {error}", file=sys.stderr)
        return 2
    try:
        return _run(args, group)
    except BatchInterrupted as stop:
        print(stop.result.summary(), file=sys.stderr)
        if stop.result.rank != 0:
            print(f"rank {stop.result.rank} interrupted: outputs written so far are complete; "
                  "rank 0 writes the report", file=sys.stderr)
            return 130
        where = stop.result.report_path or "not written"
        print(f"interrupted: outputs written so far are complete; report: {where}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted before any image was processed", file=sys.stderr)
        return 130
    finally:
        leave(group)


def _notes(args: argparse.Namespace, suppressor) -> None:
    """What the user should know about the model and the options before the run starts."""
    if args.offset_noise and suppressor.sampler != "ddpm":
        print(f"WARNING: --offset-noise with the deterministic '{suppressor.sampler}' sampler "
              "degrades the result badly (benchmarks/results/quality-demo-*); use it with ddpm "
              "only", file=sys.stderr)
    if suppressor.is_random:
        print(RANDOM_MODEL_WARNING.format(name=suppressor.config.name, spec=args.model),
              file=sys.stderr)
    elif Path(suppressor.source).resolve() == DEMO_DIR:
        print(DEMO_MODEL_NOTE, file=sys.stderr)


def _run(args: argparse.Namespace, group) -> int:
    from ..distributed import rank_device
    from ..engines.cache import EngineError
    from ..modeldir import ModelDirError
    from ..suppressor import Suppressor

    options = BatchOptions(overwrite=args.overwrite, skip_existing=args.skip_existing,
                           bone=args.bone, side_by_side=args.side_by_side, report=args.report)
    jobs: list = []

    def look() -> list[str]:
        """On rank 0: the inputs, or the lines saying why there are none."""
        jobs.extend(find_images(args.inputs, report_all=True))
        if any(job.problem is None for job in jobs):
            return []
        return ([f"{job.source}: {job.problem}" for job in jobs]
                + ["error: no DICOM, PNG, JPEG or TIFF images found in the inputs"])

    try:  # path problems first, before a model is loaded
        problems = broadcast(group, look, (ImageError,))
        if problems:
            for line in problems:
                print(line, file=sys.stderr)
            return 2
        folder = prepare_output(args.inputs, jobs, Path(args.output), options, group)
    except ImageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rank = f"rank {group.rank}: " if group.world > 1 else ""
    with folder:  # locked from here until the run ends
        suppressor, error = None, None
        try:
            suppressor = Suppressor.from_pretrained(
                args.model, device=rank_device(args.device), sampler=args.sampler,
                steps=args.steps, seed=args.seed, precision=args.precision,
                offset_noise=args.offset_noise, batch_size=args.batch_size, backend=args.backend,
            )
        except (ModelDirError, EngineError, ValueError) as e:
            error = str(e)
        error = agree(group, error)  # every rank has its model, or every rank stops
        if error is not None:
            print(f"error: {error}", file=sys.stderr)
            return 2
        if group.rank == 0:  # once per job
            _notes(args, suppressor)
        print(
            f"{rank}model {suppressor.source} ({suppressor.config.name}, {suppressor.config.image_size} "
            f"px), {suppressor.sampler} x {suppressor.steps} steps, {suppressor.device}, "
            f"{args.precision}, {suppressor.backend}",
            file=sys.stderr,
        )
        try:
            result = run_batch(suppressor.suppress_unit, suppressor.provenance(), args.inputs,
                               args.output, options, args.batch_size, prepared=folder)
        except ImageError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    if result.rank != 0:
        print(f"{rank}{len(result.written)} of its {len(result.outcomes)} images written, "
              f"{len(result.failed)} failed, {result.images_per_s:.2f} images/s; rank 0 writes "
              "the report", file=sys.stderr)
        return 0 if result.job_ok else 1
    print(result.summary(), file=sys.stderr)
    if result.lost:
        print(f"rank(s) {', '.join(map(str, result.lost))} stopped before finishing their share; "
              "run again with --skip-existing to finish the job", file=sys.stderr)
    if result.removed:
        print(f"removed {len(result.removed)} temporary file(s) left by an earlier, interrupted "
              "run", file=sys.stderr)
    if result.failed:
        print(f"{len(result.failed)} failed:", file=sys.stderr)
        for outcome in result.failed:
            print(f"  {outcome.source}: {outcome.reason}", file=sys.stderr)
        return 1
    return 0
