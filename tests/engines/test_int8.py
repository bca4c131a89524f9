"""The int8 OpenVINO U-Net (engines/int8.py) on the tiny random model: accuracy against the fp32
torch U-Net on held-out real-looking inputs, the manifest and staleness rules, and the gate's refusal."""

import dataclasses
import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch

from bsldm_fast import modeldir
from bsldm_fast.engines import int8
from bsldm_fast.engines.cache import EngineError, manifest_path, read_manifest, write_manifest
from bsldm_fast.engines.onnx_export import relative_error
from bsldm_fast.models.latent import LatentDenoiser

pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("openvino", "nncf", "onnx")),
    reason="the int8 U-Net needs openvino, nncf and onnx: pip install 'bsldm-fast[int8,onnx]'")

PHANTOMS = (0, 1)
RUNS = (("ddpm", 10, 0),)
"""A small calibration recipe (the default records 40 U-Net inputs per image), to keep the tests short."""
RMS_TOLERANCE = 0.12
"""Relative RMS error of the int8 U-Net's eps against fp32 torch on 10 held-out inputs (a phantom
the calibration never saw). Measured: 0.056, max-abs relative 0.108 (OpenVINO 2026.4.1, NNCF 3.4.0,
the default options, bf16 hint for the float layers); about 2x margin."""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    model = modeldir.random_model("tiny", seed=3)
    model_dir = tmp_path_factory.mktemp("int8") / "model"
    modeldir.save(model_dir, model.config, model.vqgan, model.unet)
    path = int8.int8_unet_ir(model_dir, model, calibration_images=[], phantoms=PHANTOMS, runs=RUNS)
    return model, model_dir, path


def _held_out_feeds(model):
    images, _ = int8.calibration_units(model, [], phantoms=(11,))
    feeds = int8.calibration_set(model, images, runs=(("ddpm", None, 7),))
    return (np.concatenate([f["U"] for f in feeds]), np.concatenate([f["t"] for f in feeds]))


def test_int8_unet_matches_fp32_on_held_out_inputs(built):
    model, model_dir, path = built
    assert path == int8.int8_ir_path(model_dir) and path.with_suffix(".bin").is_file()
    u, t = _held_out_feeds(model)
    with torch.inference_mode():
        expected = LatentDenoiser(model.unet, model.config).eval()(torch.from_numpy(u), torch.from_numpy(t)).numpy()
    actual = int8.compile_unet(path, "bf16")({"U": u, "t": t})[0]
    assert actual.shape == expected.shape == (len(t), 4, 8, 8)
    rms = float(np.sqrt(((actual - expected) ** 2).mean() / (expected ** 2).mean()))
    print(f"int8 vs fp32 on {len(t)} held-out inputs: relative RMS {rms:.4f}, "
          f"max {relative_error(actual, expected):.4f}")
    assert rms <= RMS_TOLERANCE, f"relative RMS {rms:.4f} (max rel {relative_error(actual, expected):.4f})"
    # It is quantised: fp32 and int8 differ more than float rounding would.
    assert rms > 1e-4


def test_manifest_keeps_rebuilds_and_refuses(built, tmp_path, monkeypatch):
    model, model_dir, _ = built
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    path = int8.int8_ir_path(copy)
    key = json.loads(manifest_path(path).read_text())
    assert key["kind"] == "Int8Key" and key["nncf_version"] and key["openvino_version"]
    assert key["calibration"] == int8.calibration_digest(int8.calibration_units(model, [], PHANTOMS)[0], RUNS)

    calls = []
    original = int8.quantize_unet
    monkeypatch.setattr(int8, "quantize_unet", lambda *a, **k: calls.append(a) or original(*a, **k))
    assert int8.int8_unet_ir(copy, model, [], PHANTOMS, runs=RUNS) == path and not calls  # kept
    # No calibration set named (the runner's call): the IR of the weights, versions and options is kept.
    assert int8.int8_unet_ir(copy, model, None, runs=RUNS) == path and not calls
    int8.int8_unet_ir(copy, model, [], (0,), runs=RUNS)  # another calibration set: rebuilt
    assert len(calls) == 1
    assert json.loads(manifest_path(path).read_text())["calibration"] != key["calibration"]

    manifest_path(path).unlink()  # someone else's IR is never replaced
    with pytest.raises(EngineError, match="not written by bsldm_fast"):
        int8.int8_unet_ir(copy, model, [], (0,), runs=RUNS)


def test_refusal_until_a_passing_gate_for_this_ir(built, tmp_path):
    model, model_dir, _ = built
    assert "no int8 U-Net" in int8.int8_refusal(tmp_path)
    assert "model directory" in int8.int8_refusal(None)
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    assert int8.int8_gate(copy) is None
    assert "not been through the quality gate" in int8.int8_refusal(copy)

    int8.write_gate(copy, {"passed": False, "reason": "pair 2: PSNR +0.500 dB below bf16"})
    assert int8.int8_gate(copy)["passed"] is False
    assert "failed the quality gate: pair 2: PSNR +0.500 dB" in int8.int8_refusal(copy)

    int8.write_gate(copy, {"passed": True, "reason": "within the bounds"})
    assert int8.int8_refusal(copy) is None

    # A rebuilt IR (here: its manifest rewritten for another calibration set) is not covered by
    # the old verdict.
    key = read_manifest(int8.int8_ir_path(copy), int8.Int8Key)
    write_manifest(int8.int8_ir_path(copy), dataclasses.replace(key, calibration="0" * 16))
    assert "changed since its quality gate" in int8.int8_refusal(copy)


def test_the_openvino_runner_runs_int8_only_behind_a_passing_gate(built, caplog):
    """`--backend openvino --precision int8`: the int8 U-Net (the embedding in float32, as the
    bf16 runner) once the gate passed for this IR; before that the U-Net runs bf16 and says why."""
    from bsldm_fast.engines.openvino import OpenVINORunner

    model, model_dir, _ = built
    u, t = _held_out_feeds(model)
    u, t = torch.from_numpy(u[:2]), torch.from_numpy(t[:2])
    with torch.inference_mode():
        expected = LatentDenoiser(model.unet, model.config).eval()(u, t).numpy()

    def rms(runner):
        actual = runner.denoise(u, t).numpy()
        return float(np.sqrt(((actual - expected) ** 2).mean() / (expected ** 2).mean()))

    int8.write_gate(model_dir, {"passed": False, "reason": "test: failed"})
    with caplog.at_level("WARNING"):
        refused = OpenVINORunner(model.config, model.vqgan, model.unet, "int8", model_dir)
    assert refused.int8_refusal is not None and "not int8" in caplog.text
    bf16 = rms(refused)
    int8.write_gate(model_dir, {"passed": True, "reason": "test: passed"})
    runner = OpenVINORunner(model.config, model.vqgan, model.unet, "int8", model_dir)
    assert runner.int8_refusal is None
    quantised = rms(runner)
    assert bf16 < 2e-2 < quantised <= RMS_TOLERANCE  # bf16 rounds; int8 quantises
