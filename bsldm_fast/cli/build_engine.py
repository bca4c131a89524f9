"""`bsldm-fast build-engine`: build (or reuse) the TensorRT engines of a model directory."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..engines.cache import ENGINE_PRECISIONS
    from ..engines.graphs import GRAPH_NAMES

    p = sub.add_parser(
        "build-engine",
        help="build TensorRT engines for this GPU (needs TensorRT and an NVIDIA GPU)",
        description="Export the ONNX graphs if needed, then build a TensorRT engine per graph into "
        "MODEL_DIR/engines/, keyed by the weights, TensorRT version, GPU, precision and batch "
        "profile. Fresh engines are reused; stale ones are rebuilt and replaced.",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="model directory (config.json + safetensors)")
    p.add_argument("--precision", default="fp16", choices=ENGINE_PRECISIONS,
                   help="fp16 or bf16 (GroupNorm stays float32), or fp8/int8 post-training "
                        "quantisation of the U-Net with NVIDIA ModelOpt (default fp16)")
    p.add_argument("--graphs", nargs="+", default=list(GRAPH_NAMES), choices=GRAPH_NAMES,
                   help="which graphs (default: all three)")
    p.add_argument("--min-batch", type=int, default=1, help="smallest batch of the profile (1)")
    p.add_argument("--opt-batch", type=int, default=1, help="batch the kernels are tuned for (1)")
    p.add_argument("--max-batch", type=int, default=16, help="largest batch of the profile (16)")
    p.add_argument("--workspace-gib", type=float, default=None,
                   help="cap on TensorRT's builder workspace (default: TensorRT's, the GPU's memory)")
    p.add_argument("--calibration-images", nargs="+", default=[], metavar="IMG",
                   help="radiographs (files or folders) to calibrate fp8/int8 on")
    p.add_argument("--force", action="store_true", help="rebuild even if a fresh engine is cached")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..engines.cache import EngineError
    from ..engines.graphs import BatchProfile
    from ..engines.tensorrt import build_engines
    from ..modeldir import ModelDirError

    try:
        profile = BatchProfile(args.min_batch, args.opt_batch, args.max_batch)
        results = build_engines(
            args.model_dir, args.precision, profile, tuple(args.graphs), force=args.force,
            calibration_images=args.calibration_images, workspace_gib=args.workspace_gib,
            progress=lambda text: print(text, file=sys.stderr),
        )
    except (ModelDirError, EngineError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for graph, (path, built) in results.items():
        print(f"{graph}: {'built' if built else 'up to date'} {path}", file=sys.stderr)
    return 0
