"""Paired training data in the original's layout: DIR/CXR/<name> and DIR/BS/<name> (e.g. <name>.png).

The split (train_set.txt / test_set.txt, one name per line, as the original repository) is made
once with a seed and reused. Files are read and resized by `preprocess`, exactly as inference reads
them (any supported format: 8/16-bit PNG over the type's full range, TIFF/JPEG upright, DICOM through
its Modality/VOI LUTs with MONOCHROME1 inverted), then mapped to [-1, 1]. A file that cannot be read
is reported by name and replaced by the next readable sample of the split, so an epoch never stops
and every rank keeps the same batch shape (DDP needs that).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from .._files import atomic_write
from ..io.formats import ImageError, is_image_path
from ..preprocess import read_at_size, to_model_range

logger = logging.getLogger(__name__)

CXR_DIR = "CXR"
BS_DIR = "BS"
TRAIN_FILE = "train_set.txt"
VAL_FILE = "test_set.txt"


class DataError(ValueError):
    """The data folder cannot be used for training; the message says why."""


def paired_names(data_dir: str | Path) -> list[str]:
    """Relative names present in both CXR/ and BS/; unpaired files are reported by name."""
    root = Path(data_dir)
    cxr_root, bs_root = root / CXR_DIR, root / BS_DIR
    for folder in (cxr_root, bs_root):
        if not folder.is_dir():
            raise DataError(f"{root}: expected the folders {CXR_DIR}/ and {BS_DIR}/ (missing {folder})")

    def names(folder: Path) -> set[str]:
        return {p.relative_to(folder).as_posix() for p in folder.rglob("*")
                if p.is_file() and is_image_path(p)}

    cxr, bs = names(cxr_root), names(bs_root)
    for name in sorted(cxr - bs):
        logger.warning("skipping %s: no soft-tissue image %s", cxr_root / name, bs_root / name)
    for name in sorted(bs - cxr):
        logger.warning("skipping %s: no CXR image %s", bs_root / name, cxr_root / name)
    paired = sorted(cxr & bs)
    if not paired:
        raise DataError(f"{root}: no image has the same name in {CXR_DIR}/ and {BS_DIR}/")
    return paired


def _writable(folder: Path) -> bool:
    return folder.is_dir() and os.access(folder, os.W_OK)


def split_files(data_dir: str | Path, split_dir: str | Path | None, fallback_dir: str | Path,
                val_fraction: float, seed: int) -> tuple[Path, Path]:
    """Paths of train_set.txt and test_set.txt, made (seeded, atomically) if they do not exist yet.

    They go in `split_dir`, or the data folder, or `fallback_dir` when the data folder is read-only.
    Existing split files are never rewritten.
    """
    candidates = [Path(split_dir)] if split_dir else [Path(data_dir), Path(fallback_dir)]
    for folder in candidates:
        train, val = folder / TRAIN_FILE, folder / VAL_FILE
        if train.is_file() and val.is_file():
            logger.info("using the existing split %s, %s", train, val)
            return train, val
    folder = next((c for c in candidates if _writable(c)), candidates[-1])
    folder.mkdir(parents=True, exist_ok=True)
    names = paired_names(data_dir)
    order = list(names)
    random.Random(seed).shuffle(order)
    n_val = int(round(len(order) * val_fraction))
    if val_fraction > 0 and len(order) > 1:
        n_val = min(max(n_val, 1), len(order) - 1)
    val_names, train_names = sorted(order[:n_val]), sorted(order[n_val:])
    train, val = folder / TRAIN_FILE, folder / VAL_FILE
    atomic_write(train, lambda f: Path(f).write_text("".join(n + "\n" for n in train_names)))
    atomic_write(val, lambda f: Path(f).write_text("".join(n + "\n" for n in val_names)))
    logger.warning("made a new split (seed %d): %d train, %d validation pairs in %s",
                   seed, len(train_names), len(val_names), folder)
    return train, val


def read_split(path: str | Path, data_dir: str | Path) -> list[str]:
    """Names listed in a split file that exist in both folders; missing ones are reported."""
    root = Path(data_dir)
    names = []
    for line in Path(path).read_text().splitlines():
        name = line.strip().split("\t")[0]
        if not name:
            continue
        missing = [d for d in (CXR_DIR, BS_DIR) if not (root / d / name).is_file()]
        if missing:
            logger.warning("skipping %s listed in %s: missing in %s", name, path, " and ".join(missing))
            continue
        names.append(name)
    return names


def _key(*parts: int) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def sample_generator(*parts: int) -> torch.Generator:
    """A CPU generator keyed by integers (seed, epoch, index, ...): the same draws whatever the
    number of ranks, workers or the batch layout, so resumed and distributed runs match."""
    return torch.Generator().manual_seed(_key(*parts))


def augment_pair(images: torch.Tensor, generator: torch.Generator, max_rotate: float,
                 max_translate: float, max_scale: float, intensity_jitter: float) -> torch.Tensor:
    """One random small affine and contrast/brightness change applied to a [N, 1, S, S] stack in [0, 1]."""
    u = torch.rand(5, generator=generator, dtype=torch.float64) * 2 - 1
    angle = math.radians(max_rotate) * float(u[0])
    scale = 1.0 + max_scale * float(u[1])
    tx, ty = 2 * max_translate * float(u[2]), 2 * max_translate * float(u[3])
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    theta = torch.tensor([[cos, -sin, tx], [sin, cos, ty]], dtype=images.dtype)
    grid = F.affine_grid(theta.expand(images.shape[0], 2, 3), list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    contrast = 1.0 + intensity_jitter * float(u[4])
    brightness = intensity_jitter * float(torch.rand(1, generator=generator, dtype=torch.float64) * 2 - 1)
    return ((out - 0.5) * contrast + 0.5 + brightness).clamp(0.0, 1.0)


def random_crop(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """The same random `size` x `size` window of every image of a [..., S, S] stack."""
    top, left = (torch.randint(0, images.shape[-1] - size + 1, (2,), generator=generator)).tolist()
    return images[..., top : top + size, left : left + size]


class PairedDataset(Dataset):
    """(cxr, bs, index) with images [1, S, S] in [-1, 1]; `epoch` keys the augmentation."""

    def __init__(self, data_dir: str | Path, names: list[str], size: int, augment: bool = False,
                 seed: int = 0, max_rotate: float = 5.0, max_translate: float = 0.03,
                 max_scale: float = 0.05, intensity_jitter: float = 0.05, crop_size: int = 0):
        if not names:
            raise DataError(f"{data_dir}: the split lists no usable pair")
        self.root = Path(data_dir)
        self.names = list(names)
        self.size = size
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.aug_args = (max_rotate, max_translate, max_scale, intensity_jitter)
        if crop_size < 0 or crop_size > size:
            raise ValueError(f"crop_size must be in [0, {size}] (0: whole images), got {crop_size}")
        self.crop_size = crop_size
        self.bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.names)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        name = self.names[index]
        pair = torch.cat([read_at_size(self.root / CXR_DIR / name, self.size),
                          read_at_size(self.root / BS_DIR / name, self.size)])
        if self.augment:
            pair = augment_pair(pair, sample_generator(self.seed, 1, self.epoch, index), *self.aug_args)
        if self.crop_size and self.crop_size < self.size:
            pair = random_crop(pair, self.crop_size, sample_generator(self.seed, 2, self.epoch, index))
        pair = to_model_range(pair)
        return pair[0], pair[1]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        for attempt in range(len(self.names)):
            i = (index + attempt) % len(self.names)
            if i in self.bad:
                continue
            try:
                cxr, bs = self.load(i)
                return cxr, bs, i
            except (ImageError, OSError, ValueError) as error:
                # Reported once per worker; the sample is replaced, the epoch goes on.
                self.bad.add(i)
                logger.warning("skipping pair %s: %s", self.names[i], error)
        raise DataError(f"{self.root}: no readable pair left in the split")


class SingleImages(Dataset):
    """The VQGAN's view of a paired dataset: every CXR and every soft-tissue image, as single images."""

    def __init__(self, pairs: PairedDataset):
        self.pairs = pairs

    def __len__(self) -> int:
        return 2 * len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        self.pairs.set_epoch(epoch)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        cxr, bs, i = self.pairs[index // 2]
        # Index 2i is pair i's CXR, 2i + 1 its soft-tissue image.
        return (cxr if index % 2 == 0 else bs), 2 * i + index % 2


class ShardSampler(Sampler[int]):
    """DistributedSampler's order (seeded per epoch, padded, rank::world) that can start mid-epoch.

    The permutation depends only on (seed, epoch), so a single process and N ranks see the same
    samples per step, and a resumed run skips exactly the batches already done.
    """

    def __init__(self, length: int, rank: int, world: int, seed: int, shuffle: bool = True):
        self.length = length
        self.rank = rank
        self.world = world
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0
        self.per_rank = math.ceil(length / world)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Epoch `epoch`, skipping this rank's first `start` samples."""
        self.epoch = epoch
        self.start = start

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        total = self.per_rank * self.world
        order = (order * math.ceil(total / len(order)))[:total]
        return order[self.rank : total : self.world]

    def __iter__(self):
        return iter(self.indices()[self.start :])

    def __len__(self) -> int:
        return self.per_rank - self.start


def seed_worker(worker_id: int) -> None:
    """DataLoader worker init: numpy and random from torch's per-worker seed (augmentation does not
    use them, but third-party transforms might)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
