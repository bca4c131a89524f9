"""Run logs on rank 0: a console progress bar, `log.csv`, TensorBoard when installed, sample images."""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path

import numpy as np

from ..io.images import write_image

logger = logging.getLogger(__name__)

CSV_FILE = "log.csv"
CSV_COLUMNS = ("time", "split", "epoch", "step", "metric", "value")


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, values: dict) -> None:
        pass

    def close(self) -> None:
        pass


class RunLog:
    """Everything a run reports; on ranks other than 0 it does nothing."""

    def __init__(self, out: Path, main: bool, tensorboard: bool = True):
        self.main = main
        self.out = Path(out)
        self.writer = None
        self.csv = None
        if not main:
            return
        path = self.out / CSV_FILE
        new = not path.exists()
        # Appending: a resumed run continues the same log.
        self.csv = path.open("a", newline="")
        self.rows = csv.writer(self.csv)
        if new:
            self.rows.writerow(CSV_COLUMNS)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.out / "tensorboard"))
            except ImportError:
                logger.info("TensorBoard is not installed; logging to %s only", path)

    def progress(self, total: int, desc: str, enabled: bool = True, initial: int = 0):
        if not (self.main and enabled):
            return _NoBar()
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False)

    def scalars(self, split: str, step: int, epoch: int, values: dict[str, float]) -> None:
        if not self.main:
            return
        now = f"{time.time():.3f}"
        for key, value in values.items():
            self.rows.writerow((now, split, epoch, step, key, f"{value:.6g}"))
            if self.writer is not None:
                self.writer.add_scalar(f"{split}/{key}", value, step)
        self.csv.flush()

    def images(self, folder: Path, names: list[str], panels: list[np.ndarray]) -> None:
        """Side-by-side panels in [0, 1] as 8-bit PNGs (never overwriting an existing file)."""
        if not self.main:
            return
        for name, panel in zip(names, panels):
            target = folder / (Path(name).with_suffix(".png").as_posix().replace("/", "__"))
            if target.exists():
                continue
            write_image(target, np.rint(np.clip(panel, 0, 1) * 255).astype(np.uint8))

    def close(self) -> None:
        if self.csv is not None:
            self.csv.close()
        if self.writer is not None:
            self.writer.close()
