"""Fit a model directory's output anchor (`config.output_anchor`) on its real training pairs.

    python -m bsldm_fast.data.anchor --pairs assets/szch_samples --train 0,1 MODEL_DIR

The anchor's `offset` is the mean grey level of the soft-tissue images minus that of their CXRs,
over the real pairs that trained the model: the one number of display convention a few training
pairs do fix. Only those pairs may be used (a held-out pair would leak into the model), so when the
model directory lists its real training pairs (`training_data.json`) `--train` must name the same.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .._files import atomic_write
from ..config import ModelConfig, OutputAnchor
from ..modeldir import CONFIG_FILE
from ..training.trainer import trained_real_pairs
from .engine import load_pairs


def fit_offset(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean of soft - cxr over all pixels of the (cxr, soft) pairs, each pair weighted equally."""
    if not pairs:
        raise ValueError("no pairs to fit the anchor on")
    return float(np.mean([np.mean(soft - cxr) for cxr, soft in pairs]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bsldm_fast.data.anchor",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="model directory whose config.json gets the anchor")
    parser.add_argument("--pairs", required=True, help="folder with cxr/NAME.png and soft/NAME.png")
    parser.add_argument("--train", required=True,
                        help="comma-separated names of the real pairs that trained the model")
    parser.add_argument("--sigma", type=float, default=OutputAnchor.sigma,
                        help="low-pass scale as a fraction of the image width "
                             f"(default {OutputAnchor.sigma:g})")
    parser.add_argument("--dry-run", action="store_true", help="print the anchor, write nothing")
    args = parser.parse_args(argv)

    model_dir = Path(args.model_dir)
    config_path = model_dir / CONFIG_FILE
    if not config_path.is_file():
        parser.error(f"{config_path} does not exist")
    names = [n.strip() for n in args.train.split(",") if n.strip()]
    listed = trained_real_pairs(model_dir)
    if listed is not None and sorted(listed) != sorted(names):
        parser.error(f"{model_dir} was trained on real pairs {listed}; --train must name exactly "
                     "those (fitting on others would leak held-out pairs into the model)")
    config = ModelConfig.load(config_path)
    spec = OutputAnchor("input", sigma=args.sigma,
                        offset=round(fit_offset(load_pairs(args.pairs, names)), 4))
    new = config.replace(output_anchor=spec)  # validates sigma and offset
    print(f"output_anchor: {json.dumps(spec.__dict__)} (was {json.dumps(config.output_anchor.__dict__)})")
    if not args.dry_run:
        atomic_write(config_path, lambda f: Path(f).write_text(new.to_json()))
        print(f"wrote {config_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
