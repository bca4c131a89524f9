"""Train BS-LDM: `python training/train.py vqgan|ldm --data DIR [options]`, alone or under torchrun.

Argument parsing only; the training itself is `bsldm_fast.training`. Options come from the defaults,
then `--config FILE` (YAML or JSON), then the command line. See training/README.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from bsldm_fast.training import USER_ERRORS, train  # noqa: E402
from bsldm_fast.training import config as train_config  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train the BS-LDM VQGAN, then the conditional latent diffusion model. "
        "Runs as one process or under torchrun (DDP) unchanged.",
    )
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    helps = {"vqgan": "stage 1: the VQGAN autoencoder (on CXR and soft-tissue images alike)",
             "ldm": "stage 2: the conditional LDM on the frozen VQGAN's latents (needs --vqgan)"}
    for stage in train_config.STAGES:
        p = sub.add_parser(stage, help=helps[stage], description=helps[stage])
        p.add_argument("--config", metavar="FILE", help="YAML or JSON file of options (flags override it)")
        p.add_argument("-v", "--verbose", action="store_true", help="log details")
        train_config.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    overrides = {k: v for k, v in vars(args).items() if k in train_config.FIELDS and k != "stage"}
    try:
        config = train_config.make_config(args.stage, args.config, overrides)
    except (ValueError, OSError) as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    try:
        train(config)
    except USER_ERRORS as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
