"""How close each data-engine source is to real radiographs: grey-level histogram and radially
averaged power spectrum, against the real SZCH pairs, for the CXR and the soft-tissue images.

    python benchmarks/engine_realism.py --train 0,1 --held-out 2 [--count 40] [--size 512]

Sources: the engine's `real`, `transplant` and `phantom` draws (made from the --train pairs only),
and plain procedural phantoms (`bsldm_fast.data.phantom`, what the 2026-11 demo model trained on).
References: the --held-out real pairs (never seen by the engine) and, separately, the --train ones.
Distances: histogram L1 (0 = same grey-level distribution, 2 = disjoint) and the RMS difference of
log10 power spectra (0 = same texture and sharpness). Writes RESULTS.json and RESULTS.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bsldm_fast.data import engine, phantom  # noqa: E402

BINS = 64


def histogram(image: np.ndarray) -> np.ndarray:
    h, _ = np.histogram(np.clip(image, 0, 1), bins=BINS, range=(0, 1))
    return h / h.sum()


def power_spectrum(image: np.ndarray) -> np.ndarray:
    """Radially averaged power spectrum of the mean-free image, in radial frequency bins 1..size/2."""
    size = image.shape[0]
    f = np.fft.fftshift(np.fft.fft2(image - image.mean()))
    power = np.abs(f) ** 2 / image.size
    y, x = np.indices(image.shape) - size // 2
    r = np.hypot(x, y).astype(int)
    total = np.bincount(r.ravel(), power.ravel())
    count = np.bincount(r.ravel())
    return (total / np.maximum(count, 1))[1 : size // 2]


def summarise(images: list[np.ndarray]) -> dict[str, np.ndarray]:
    return {"hist": np.mean([histogram(i) for i in images], axis=0),
            "spectrum": np.exp(np.mean([np.log(power_spectrum(i) + 1e-20) for i in images], axis=0))}


def distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, float]:
    return {"hist_l1": float(np.abs(a["hist"] - b["hist"]).sum()),
            "log_spectrum_rms": float(np.sqrt(np.mean((np.log10(a["spectrum"]) - np.log10(b["spectrum"])) ** 2)))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", default=str(ROOT / "assets" / "szch_samples"))
    parser.add_argument("--train", default="0,1", help="real pairs the engine draws from")
    parser.add_argument("--held-out", default="2", help="real pairs kept out of the engine")
    parser.add_argument("--count", type=int, default=40, help="draws per source")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=12345, help="engine seed (not the training data's)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "engine-realism"))
    args = parser.parse_args(argv)

    train = [n for n in args.train.split(",") if n]
    held = [n for n in args.held_out.split(",") if n]
    real_train = engine.load_pairs(args.pairs, train)
    real_held = engine.load_pairs(args.pairs, held)
    e = engine.Engine(real_train, seed=args.seed, size=args.size)
    draws: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"real": [], "transplant": [], "phantom": []}
    index = 0
    while min(len(v) for v in draws.values()) < args.count:
        kind = e.source(index)
        if len(draws[kind]) < args.count:
            cxr, soft, _ = e.pair(index)
            draws[kind].append((cxr, soft))
        index += 1
    draws["procedural phantom"] = [(p.cxr, p.soft) for p in
                                   (phantom.generate(10_000 + i, args.size) for i in range(args.count))]

    def shrink(pairs):
        return [(engine._resize(c, args.size), engine._resize(s, args.size)) for c, s in pairs]

    refs = {"held-out real": shrink(real_held), "training real": shrink(real_train)}
    record: dict = {"train": train, "held_out": held, "count": args.count, "size": args.size,
                    "sources": {}}
    stats = {}
    for kind in ("cxr", "soft"):
        k = 0 if kind == "cxr" else 1
        ref_stats = {name: summarise([p[k] for p in pairs]) for name, pairs in refs.items()}
        src_stats = {name: summarise([p[k] for p in pairs]) for name, pairs in draws.items()}
        stats[kind] = (ref_stats, src_stats)
        for name, s in src_stats.items():
            record["sources"].setdefault(name, {})[kind] = {
                ref: distance(s, r) for ref, r in ref_stats.items()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    centres = (np.arange(BINS) + 0.5) / BINS
    for row, kind in enumerate(("cxr", "soft")):
        ref_stats, src_stats = stats[kind]
        freqs = np.arange(1, args.size // 2) / args.size
        for name, s in ref_stats.items():
            style = dict(color="black", lw=2.2, ls="-" if name.startswith("held") else ":")
            axes[row, 0].plot(centres, s["hist"], label=name, **style)
            axes[row, 1].loglog(freqs, s["spectrum"], label=name, **style)
        for name, s in src_stats.items():
            d = record["sources"][name][kind]["held-out real"]
            label = f"{name} (hist L1 {d['hist_l1']:.2f}, spectrum {d['log_spectrum_rms']:.2f})"
            axes[row, 0].plot(centres, s["hist"], label=label, lw=1.2)
            axes[row, 1].loglog(freqs, s["spectrum"], label=name, lw=1.2)
        axes[row, 0].set_title(f"{kind.upper()}: grey-level histogram (distances to held-out real)")
        axes[row, 0].set_xlabel("display value")
        axes[row, 0].legend(fontsize=7)
        axes[row, 1].set_title(f"{kind.upper()}: radially averaged power spectrum")
        axes[row, 1].set_xlabel("cycles / pixel")
        axes[row, 1].legend(fontsize=7)
    fig.suptitle(f"Data-engine sources vs real SZCH radiographs ({args.count} draws each, "
                 f"{args.size} px; engine fed pairs {','.join(train)}, held out {','.join(held)})")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=90)
    for name, kinds in record["sources"].items():
        for kind, refs_d in kinds.items():
            d = refs_d["held-out real"]
            print(f"{name:20s} {kind:4s} hist L1 {d['hist_l1']:.3f}  log-spectrum RMS {d['log_spectrum_rms']:.3f}")
    print(f"wrote {out}.json/.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
