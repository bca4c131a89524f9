"""Paired data: split files, 8/16-bit loading, bad and unpaired files, aligned augmentation, sharding."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from bsldm_fast.io.images import read_image
from bsldm_fast.training.data import (
    PairedDataset, ShardSampler, SingleImages, augment_pair, paired_names, read_split, sample_generator,
    split_files,
)

from train_helpers import make_pairs


def test_split_is_made_once_and_reused(pairs, tmp_path):
    train, val = split_files(pairs, None, tmp_path / "run", 0.25, seed=1)
    assert train.parent == pairs  # beside the data, as the original's train_set.txt / test_set.txt
    names_train, names_val = train.read_text().split(), val.read_text().split()
    assert len(names_val) == 2 and sorted(names_train + names_val) == paired_names(pairs)
    # Another seed or fraction does not rewrite an existing split.
    assert split_files(pairs, None, tmp_path / "run", 0.5, seed=2) == (train, val)
    assert train.read_text().split() == names_train
    # A fresh split with the same seed is the same split.
    other = make_pairs(tmp_path / "copy")
    t2, _ = split_files(other, None, tmp_path / "run2", 0.25, seed=1)
    assert t2.read_text().split() == names_train


def test_read_only_data_folder_puts_the_split_in_the_run(pairs, tmp_path, monkeypatch):
    from bsldm_fast.training import data

    # Root may write anywhere, so the permission check itself is what is replaced.
    monkeypatch.setattr(data, "_writable", lambda folder: folder != pairs)
    train, _ = split_files(pairs, None, tmp_path / "run", 0.25, seed=0)
    assert train.parent == tmp_path / "run" and not (pairs / "train_set.txt").exists()
    assert split_files(pairs, None, tmp_path / "run", 0.25, seed=0)[0] == train  # found again


@pytest.mark.parametrize("bits", [8, 16])
def test_images_map_to_minus_one_one_at_model_size(tmp_path, bits):
    root = make_pairs(tmp_path / "d", count=2, size=48, bits=bits)
    ds = PairedDataset(root, ["000.png", "001.png"], size=32)
    cxr, bs, index = ds[1]
    assert index == 1 and cxr.shape == bs.shape == (1, 32, 32)
    raw = read_image(root / "CXR" / "001.png").astype(np.float64) / (255 if bits == 8 else 65535)
    ref = torch.nn.functional.interpolate(torch.from_numpy(raw)[None, None], size=(32, 32),
                                          mode="bilinear", antialias=True, align_corners=False)[0]
    torch.testing.assert_close(cxr.double(), ref * 2 - 1, atol=1e-5, rtol=0)
    assert cxr.min() >= -1 and cxr.max() <= 1


def test_unpaired_and_bad_files_are_reported_and_skipped(pairs, caplog):
    (pairs / "CXR" / "lonely.png").write_bytes((pairs / "CXR" / "000.png").read_bytes())
    (pairs / "BS" / "002.png").write_bytes(b"not a png")  # paired by name, unreadable
    with caplog.at_level(logging.WARNING):
        names = paired_names(pairs)
    assert "lonely.png" not in names and "lonely.png" in caplog.text
    ds = PairedDataset(pairs, names, size=64)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        seen = [ds[i][2] for i in range(len(ds))]  # a whole epoch: no exception
    assert "002.png" in caplog.text and 2 not in seen and len(seen) == len(ds)


def test_split_entries_missing_on_disk_are_skipped(pairs, tmp_path, caplog):
    listing = tmp_path / "train_set.txt"
    listing.write_text("000.png\ngone.png\n001.png\n")
    with caplog.at_level(logging.WARNING):
        assert read_split(listing, pairs) == ["000.png", "001.png"]
    assert "gone.png" in caplog.text


def test_augmentation_moves_both_images_alike(gen):
    base = torch.rand(1, 1, 32, 32, generator=gen)
    pair = torch.cat([base, base])
    out = augment_pair(pair, sample_generator(0, 1, 2, 3), 10.0, 0.1, 0.1, 0.1)
    assert torch.equal(out[0], out[1]) and not torch.allclose(out[0], base[0], atol=1e-3)
    again = augment_pair(pair, sample_generator(0, 1, 2, 3), 10.0, 0.1, 0.1, 0.1)
    assert torch.equal(out, again)  # keyed, not drawn from a global state


def test_single_images_cover_cxr_and_soft_tissue(pairs):
    ds = PairedDataset(pairs, paired_names(pairs), size=64)
    single = SingleImages(ds)
    assert len(single) == 2 * len(ds)
    cxr, bs, _ = ds[3]
    assert torch.equal(single[6][0], cxr) and torch.equal(single[7][0], bs)


@pytest.mark.parametrize("length,world", [(10, 1), (10, 2), (7, 3)])
def test_shards_partition_the_single_process_order(length, world):
    single = ShardSampler(length, 0, 1, seed=4)
    single.set_epoch(2)
    shards = []
    for rank in range(world):
        s = ShardSampler(length, rank, world, seed=4)
        s.set_epoch(2)
        shards.append(s.indices())
    # Step k of a world of N ranks with batch b sees the samples of single-process step k with batch N*b.
    interleaved = [shards[r][i] for i in range(len(shards[0])) for r in range(world)]
    assert interleaved[:length] == single.indices()
    s = ShardSampler(length, world - 1, world, seed=4)
    s.set_epoch(2, start=2)
    assert list(s) == shards[-1][2:] and len(s) == len(shards[-1]) - 2
