"""`bsldm-fast export` and `bsldm-fast build-engine` from the command line."""

import json

import pytest

from bsldm_fast.cli import main
from bsldm_fast.engines.tensorrt import available
from bsldm_fast.modeldir import random_model, save


@pytest.fixture
def model_dir(tmp_path):
    model = random_model("tiny", seed=8)
    return save(tmp_path / "m", model.config, model.vqgan, model.unet)


def test_export_checks_then_keeps_fresh_graphs(model_dir, capsys):
    assert main(["export", str(model_dir)]) == 0
    err = capsys.readouterr().err
    assert err.count("exported") == 3 and err.count(", ok)") == 3
    for graph in ("encoder", "decoder", "unet"):
        manifest = json.loads((model_dir / "onnx" / f"{graph}-fp32.onnx.json").read_text())
        assert manifest["opset"] == 17 and manifest["graph"] == graph
    assert main(["export", str(model_dir), "--graphs", "unet"]) == 0
    assert "unet: up to date" in capsys.readouterr().err


def test_export_never_replaces_a_foreign_file(model_dir, capsys):
    (model_dir / "onnx").mkdir()
    foreign = model_dir / "onnx" / "decoder-fp32.onnx"
    foreign.write_bytes(b"someone else's graph")
    assert main(["export", str(model_dir), "--graphs", "decoder"]) == 2
    assert "not written by bsldm_fast" in capsys.readouterr().err
    assert foreign.read_bytes() == b"someone else's graph"
    assert main(["export", str(model_dir), "--graphs", "decoder", "--overwrite", "--no-check"]) == 0
    assert foreign.read_bytes() != b"someone else's graph"


def test_export_reports_a_missing_model(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.skipif(available(), reason="checks the message shown where TensorRT is missing")
def test_build_engine_without_tensorrt_says_how_to_get_it(model_dir, capsys):
    assert main(["build-engine", str(model_dir), "--precision", "fp16"]) == 2
    err = capsys.readouterr().err
    assert "TensorRT is not installed" in err or "no CUDA device" in err
