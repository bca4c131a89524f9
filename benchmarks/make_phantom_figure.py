"""Figure: synthetic phantoms (CXR / soft tissue / bone) beside the three real SZCH-X-Rays pairs,
with the intensity histograms of both. Writes assets/phantoms.png.

    python benchmarks/make_phantom_figure.py [--out assets/phantoms.png] [--seeds 0 1 2] [--size 512]
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from bsldm_fast._files import atomic_write  # noqa: E402
from bsldm_fast.data import phantom  # noqa: E402
from bsldm_fast.io import read_image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "assets" / "szch_samples"


def _real_pairs() -> list[tuple[np.ndarray, np.ndarray]]:
    pairs = []
    for cxr_path in sorted((SAMPLES / "cxr").glob("*.png")):
        cxr = read_image(cxr_path).astype(np.float32) / 255.0
        soft = read_image(SAMPLES / "soft" / cxr_path.name).astype(np.float32) / 255.0
        pairs.append((cxr, soft))
    return pairs


def _small(image: np.ndarray, size: int = 256) -> np.ndarray:
    """Downscaled for the figure (keeps the PNG small)."""
    pil = Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8))
    return np.asarray(pil.resize((size, size), Image.LANCZOS)) / 255.0


def make_figure(seeds: list[int], size: int) -> bytes:
    real = _real_pairs()
    synthetic = [phantom.generate(seed, size) for seed in seeds]
    rows = max(len(real), len(synthetic))
    fig, axes = plt.subplots(rows + 1, 6, figsize=(12, 2.1 * rows + 2.2),
                             gridspec_kw={"height_ratios": [1] * rows + [0.9]})
    titles = ["real CXR", "real soft tissue (DES)", "real bone = CXR - soft",
              "phantom CXR", "phantom soft tissue", "phantom bone"]
    for r in range(rows):
        panels = []
        panels += list(real[r]) + [real[r][0] - real[r][1]] if r < len(real) else [None] * 3
        if r < len(synthetic):
            p = synthetic[r]
            panels += [p.cxr, p.soft, p.bone]
        else:
            panels += [None] * 3
        for c, image in enumerate(panels):
            ax = axes[r, c]
            ax.axis("off")
            if image is None:
                continue
            bone = c % 3 == 2
            # Bone images are differences: show them on a stretched scale.
            ax.imshow(_small(np.clip(image, 0, None) * (2.5 if bone else 1.0)), cmap="gray",
                      vmin=0, vmax=1, interpolation="lanczos")
            if r == 0:
                ax.set_title(titles[c] + (" (x2.5)" if bone else ""), fontsize=9)
        if r < len(synthetic):
            axes[r, 3].text(-0.04, 0.5, f"seed {seeds[r]}", transform=axes[r, 3].transAxes,
                            rotation=90, va="center", ha="right", fontsize=8)
    bins = np.linspace(0, 1, 65)
    for c, (label, real_images, synth_images) in enumerate([
        ("CXR", [p[0] for p in real], [p.cxr for p in synthetic]),
        ("soft tissue", [p[1] for p in real], [p.soft for p in synthetic]),
    ]):
        ax = plt.subplot2grid((rows + 1, 6), (rows, 3 * c), colspan=3, fig=fig)
        ax.hist(np.concatenate([i.ravel() for i in real_images]), bins, density=True, alpha=0.6,
                label="real (3)")
        ax.hist(np.concatenate([i.ravel() for i in synth_images]), bins, density=True, alpha=0.6,
                label=f"phantoms ({len(synthetic)})")
        ax.set_title(f"{label} intensity histogram", fontsize=9)
        ax.set_xlabel("display value", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=8)
    for c in range(6):
        axes[rows, c].axis("off")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=72)
    plt.close(fig)
    # A 128-colour palette keeps the figure well under 500 KB.
    image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB").quantize(colors=128, method=Image.MEDIANCUT)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "assets" / "phantoms.png"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    data = make_figure(args.seeds, args.size)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: Path(tmp).write_bytes(data))
    print(f"wrote {out} ({len(data) / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
