"""`bsldm-fast convert`: the official BS-LDM checkpoints -> a model directory, without running them."""

from __future__ import annotations

import argparse
import sys

from ..config import PRESETS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert the official BS-LDM checkpoints (LDM + VQGAN .pth) into a model directory",
        description="Read the authors' torch.save(model) checkpoints, state dicts, checkpoint dicts "
        "or safetensors without importing or running any code they name, infer the configuration "
        "from the tensors (or check it against --config) and write a model directory for "
        "`bsldm-fast suppress --model`.",
    )
    p.add_argument("--unet", required=True, metavar="LDM.pth", help="the U-Net (noise estimator) checkpoint")
    p.add_argument("--vqgan", required=True, metavar="VQGAN.pth", help="the VQGAN checkpoint")
    p.add_argument("-o", "--output", required=True, metavar="MODEL_DIR", help="model directory to write")
    p.add_argument("--config", choices=sorted(PRESETS), default=None,
                   help="check the weights against this named config and use it (default: infer "
                        "the config from the weights)")
    p.add_argument("--image-size", type=int, default=None,
                   help="model resolution, when the weights cannot tell it (state dicts of a "
                        "non-standard model)")
    ema = p.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="ema", action="store_true", default=None,
                     help="require the EMA weights of a U-Net checkpoint dict")
    ema.add_argument("--no-ema", dest="ema", action="store_false",
                     help="take the raw weights even when a checkpoint dict holds EMA weights")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in MODEL_DIR")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..convert import convert
    from ..modeldir import ModelDirError, load

    try:
        path = convert(args.unet, args.vqgan, args.output, config=args.config,
                       image_size=args.image_size, ema=args.ema, overwrite=args.overwrite)
        config = load(path).config
    except (ValueError, ModelDirError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path} (config {config.name}, {config.image_size} px)", file=sys.stderr)
    return 0
