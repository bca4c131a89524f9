"""`bsldm-fast eval`: pairing by relative path, the CSV, the summary and clear errors."""

import csv

import numpy as np
import pytest

from bsldm_fast import metrics
from bsldm_fast.cli import main
from bsldm_fast.io import write_image


@pytest.fixture
def folders(tmp_path):
    rng = np.random.default_rng()
    names = ["a.png", "sub/b.png"]
    for name in names:
        target = rng.integers(30, 200, (24, 24), dtype=np.uint8)
        write_image(tmp_path / "target" / name, target)
        write_image(tmp_path / "cxr" / name, (target + 40).astype(np.uint8))
        write_image(tmp_path / "pred" / name, (target + rng.integers(0, 20, target.shape)).astype(np.uint8))
    return tmp_path, names


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_eval_writes_csv_and_summary(folders, capsys):
    root, names = folders
    out = root / "m.csv"
    code = main(["eval", "--pred", str(root / "pred"), "--target", str(root / "target"),
                 "--cxr", str(root / "cxr"), "--csv", str(out), "--no-lpips"])
    assert code == 0
    rows = _rows(out)
    assert [r["image"] for r in rows] == names
    from bsldm_fast.io import read_image

    for row, name in zip(rows, names):
        expected = metrics.evaluate(read_image(root / "pred" / name), read_image(root / "target" / name),
                                    read_image(root / "cxr" / name))
        for key in ("bsr", "mse", "psnr", "ssim"):
            assert float(row[key]) == pytest.approx(getattr(expected, key), rel=1e-6)
    printed = capsys.readouterr().out
    assert "psnr" in printed and "2 images" in printed


def test_eval_without_cxr_has_no_bsr(folders, capsys):
    root, _ = folders
    out = root / "m.csv"
    assert main(["eval", "--pred", str(root / "pred"), "--target", str(root / "target"),
                 "--csv", str(out), "--no-lpips"]) == 0
    assert "bsr" not in _rows(out)[0]
    assert "BSR skipped" in capsys.readouterr().err


def test_eval_names_unpaired_files(folders, capsys):
    root, _ = folders
    (root / "target" / "sub" / "b.png").unlink()
    code = main(["eval", "--pred", str(root / "pred"), "--target", str(root / "target"),
                 "--csv", str(root / "m.csv"), "--no-lpips"])
    assert code == 2
    err = capsys.readouterr().err
    assert "no counterpart" in err and "b.png" in err
    assert not (root / "m.csv").exists()


def test_eval_refuses_to_overwrite_the_csv(folders, capsys):
    root, _ = folders
    out = root / "m.csv"
    out.write_text("keep me")
    code = main(["eval", "--pred", str(root / "pred"), "--target", str(root / "target"),
                 "--csv", str(out), "--no-lpips"])
    assert code == 2 and out.read_text() == "keep me"
    assert "exists" in capsys.readouterr().err


def test_eval_missing_folder(tmp_path, capsys):
    code = main(["eval", "--pred", str(tmp_path / "nope"), "--target", str(tmp_path),
                 "--csv", str(tmp_path / "m.csv")])
    assert code == 2 and "no such folder" in capsys.readouterr().err
