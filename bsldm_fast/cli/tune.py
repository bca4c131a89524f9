"""`bsldm-fast tune`: measure which runner is fastest for each network on this CPU."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..engines.tuning import CPU_BACKENDS
    from ..precision import PRECISIONS

    p = sub.add_parser(
        "tune",
        help="time the CPU runners per network and write the table backend 'auto' reads",
        description="Check, then time, every installed CPU runner (eager torch, torch.compile, "
        "OpenVINO) on the VQ encoder, the U-Net and the VQ decoder of a model, and write the "
        "results to MODEL_DIR/engines/cpu-backends.json, keyed by this CPU, the versions and the "
        "weights. `suppress --backend auto` on the CPU then runs each network on its fastest runner "
        "whose output matched the float32 reference. torch.compile takes minutes per network "
        "at the paper size.",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR",
                   help="model directory (config.json + safetensors), or 'demo' for the bundled model")
    p.add_argument("--precision", default="fp32", choices=[*sorted(PRECISIONS), "int8"],
                   help="the precision to measure (default fp32); run once per precision you use. "
                        "int8: OpenVINO with the model's quality-gated int8 networks, beside the "
                        "other runners in bf16")
    p.add_argument("--backends", nargs="+", default=list(CPU_BACKENDS), choices=CPU_BACKENDS,
                   help="which runners to try (default: all installed)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per network (median; default 3)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..engines.tuning import fastest, measure, write_table
    from ..modeldir import ModelDirError, resolve

    try:
        model = resolve(args.model_dir)
        if model.is_random:
            raise ModelDirError("an untrained random model has no directory to keep a table in")
    except ModelDirError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rows = measure(model, args.precision, 1, args.backends, args.repeats, model_dir=model.source,
                   progress=lambda text: print(text, file=sys.stderr))
    for row in rows:
        if row.seconds is None:
            print(f"{row.network} {row.backend}: not used: {row.note}", file=sys.stderr)
    try:
        path = write_table(model.source, rows)
    except OSError as error:
        print(f"error: cannot write the table into {args.model_dir}: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}; auto on this CPU at {args.precision}: {fastest(model.source, args.precision)}",
          file=sys.stderr)
    return 0
