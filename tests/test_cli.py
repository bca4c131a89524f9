import subprocess
import sys

import numpy as np
import pytest

from bsldm_fast.cli import main
from bsldm_fast.io import read_image, write_image
from bsldm_fast.modeldir import random_model, save


@pytest.fixture
def inputs(tmp_path):
    rng = np.random.default_rng()
    root = tmp_path / "in"
    write_image(root / "a.png", rng.integers(0, 256, (70, 60), dtype=np.uint8))
    write_image(root / "sub" / "b.png", rng.integers(0, 65536, (64, 64), dtype=np.uint16))
    write_image(root / "sub" / "c.jpg", rng.integers(0, 256, (50, 80), dtype=np.uint8))
    return root


def test_suppress_a_folder(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["suppress", str(inputs), "-o", str(out), "--steps", "3"]) == 0
    err = capsys.readouterr().err  # no --model: the bundled demo model, said to be a demo
    assert "demo model" in err and "NOT for clinical use" in err and "wrote 3 of 3" in err
    for rel in ("a.png", "sub/b.png", "sub/c.jpg"):
        src, dst = read_image(inputs / rel), read_image(out / rel)
        assert dst.shape == src.shape and dst.dtype == src.dtype


def test_existing_outputs_are_kept(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    write_image(out / "a.png", np.zeros((3, 3), np.uint8))
    assert main(["suppress", str(inputs / "a.png"), "-o", str(out), "--steps", "2", "--model", "random:tiny"]) == 1
    err = capsys.readouterr().err
    assert "output exists" in err and "untrained" in err
    assert read_image(out / "a.png").shape == (3, 3)
    assert main(["suppress", str(inputs / "a.png"), "-o", str(out), "--steps", "2", "--overwrite",
                 "--model", "random:tiny"]) == 0
    assert read_image(out / "a.png").shape == (70, 60)


def test_inputs_are_never_overwritten(inputs, capsys):
    before = (inputs / "a.png").read_bytes()
    assert main(["suppress", str(inputs / "a.png"), "-o", str(inputs), "--overwrite", "--steps", "2",
                 "--model", "random:tiny"]) == 1
    assert "overwrite an input" in capsys.readouterr().err
    assert (inputs / "a.png").read_bytes() == before


def test_a_trained_model_directory(inputs, tmp_path, capsys):
    model = random_model("tiny", seed=9)
    save(tmp_path / "model", model.config, model.vqgan, model.unet)
    out = tmp_path / "out"
    code = main(["suppress", str(inputs / "a.png"), "-o", str(out), "--model", str(tmp_path / "model"),
                 "--sampler", "ddim", "--steps", "3", "--seed", "4", "--device", "cpu"])
    assert code == 0
    assert "untrained" not in capsys.readouterr().err


def test_bad_arguments_exit_cleanly(inputs, tmp_path, capsys):
    assert main(["suppress", str(tmp_path / "missing.png"), "-o", str(tmp_path / "o")]) == 2
    assert main(["suppress", str(inputs), "-o", str(tmp_path / "o"), "--model", str(tmp_path)]) == 2
    assert "not a bsldm_fast model directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["suppress", str(inputs), "-o", str(tmp_path / "o"), "--sampler", "euler"])


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "bsldm_fast.cli", "suppress", "--help"],
                            capture_output=True, text=True, check=True)
    for flag in ("--sampler", "--overwrite", "--skip-existing", "--bone", "--side-by-side", "--report"):
        assert flag in result.stdout


def test_a_bad_file_is_reported_the_run_goes_on_and_exits_1(inputs, tmp_path, capsys):
    import json

    (inputs / "sub" / "empty.png").write_bytes(b"")
    out = tmp_path / "out"
    code = main(["suppress", str(inputs), "-o", str(out), "--steps", "2", "--bone", "--side-by-side",
                 "--batch-size", "2"])
    err = capsys.readouterr().err
    assert code == 1 and "wrote 3 of 4" in err and "empty file (0 bytes)" in err
    assert "images/s" in err
    for rel in ("a.png", "a.bone.png", "a.png.review.png", "sub/b.bone.png", "sub/c.jpg"):
        assert (out / rel).is_file(), rel
    report = json.loads((out / "bsldm_fast_report.json").read_text())
    assert [f["source"] for f in report["failures"]] == [str(inputs / "sub" / "empty.png")]
    # a rerun that skips what exists only retries the failure, which fails again
    code = main(["suppress", str(inputs), "-o", str(out), "--steps", "2", "--bone", "--side-by-side",
                 "--skip-existing"])
    assert code == 1 and "3 skipped, 1 failed" in capsys.readouterr().err


def test_output_folder_inside_the_input_is_refused(inputs, capsys):
    assert main(["suppress", str(inputs), "-o", str(inputs / "out"), "--steps", "2"]) == 2
    assert "outside the inputs" in capsys.readouterr().err
    assert not (inputs / "out").exists()


def test_overwrite_and_skip_existing_exclude_each_other(inputs, tmp_path):
    with pytest.raises(SystemExit):
        main(["suppress", str(inputs), "-o", str(tmp_path / "o"), "--overwrite", "--skip-existing"])


def test_formats_lists_transfer_syntaxes(capsys):
    assert main(["formats"]) == 0
    out = capsys.readouterr().out
    assert "Explicit VR Little Endian" in out and "RLE Lossless" in out and "px a side" in out
