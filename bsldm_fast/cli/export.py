"""`bsldm-fast export`: write the ONNX graphs of a model directory (encoder, decoder, U-Net)."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..engines.graphs import GRAPH_NAMES, ONNX_PRECISIONS
    from ..engines.onnx_export import DEFAULT_OPSET

    p = sub.add_parser(
        "export",
        help="export the encoder, decoder and U-Net of a model directory to ONNX",
        description="Write MODEL_DIR/onnx/<graph>-<precision>.onnx for the VQGAN encoder (with "
        "quantisation), the decoder and the U-Net, with a dynamic batch. Up-to-date graphs are "
        "kept; fp32 graphs are checked with onnxruntime against PyTorch.",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="model directory (config.json + safetensors)")
    p.add_argument("--precision", default="fp32", choices=sorted(ONNX_PRECISIONS),
                   help="compute precision of the graphs (GroupNorm stays float32); default fp32")
    p.add_argument("--graphs", nargs="+", default=list(GRAPH_NAMES), choices=GRAPH_NAMES,
                   help="which graphs (default: all three)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset, 17 or newer (default {DEFAULT_OPSET}; bf16 needs 22 and gets it)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the onnxruntime-vs-PyTorch check of fp32 graphs")
    p.add_argument("--overwrite", action="store_true",
                   help="re-export even when up to date, and replace ONNX files not written by bsldm_fast")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..engines.cache import EngineError
    from ..engines.onnx_export import CHECK_TOLERANCE, export_model_dir
    from ..modeldir import ModelDirError

    check = args.precision == "fp32" and not args.no_check
    try:
        results = export_model_dir(args.model_dir, args.precision, tuple(args.graphs), args.opset,
                                   check=check, overwrite=args.overwrite,
                                   progress=lambda text: print(text, file=sys.stderr, flush=True))
    except (ModelDirError, EngineError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    failed = False
    for result in results:
        state = "exported" if result.exported else "up to date"
        line = f"{result.graph}: {state} {result.path}"
        if result.error is not None:
            ok = result.error <= CHECK_TOLERANCE
            failed |= not ok
            line += f" (onnxruntime vs PyTorch: {result.error:.1e} relative, {'ok' if ok else 'FAILED'})"
        print(line, file=sys.stderr)
    return 1 if failed else 0
