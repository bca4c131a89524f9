"""The int8 OpenVINO networks (engines/int8.py) on the tiny random model: accuracy of the U-Net,
VQ encoder and VQ decoder against fp32 torch on held-out real-looking inputs, the manifest and
staleness rules, and the gate's refusal, per network."""

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
from bsldm_fast.engines.tuning import MAX_CODE_FLIPS, REL_MAX_ERROR
from bsldm_fast.models.latent import LatentDecoder, LatentDenoiser, LatentEncoder

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
DECODER_TOLERANCE = {"own": REL_MAX_ERROR["int8"], "sampled": 0.6}
"""max |err| / max |ref| of the int8 decoder's image against fp32 torch on held-out latents of two
phantoms the calibration never saw. Their own encoder latents: measured 0.050-0.052, bound tuning.py's
int8 bound (0.1). Their DDPM-10 sampled latents: measured 0.33-0.38, bound 0.6: the random U-Net's
samples reach |4| where the encoder latents stay under 1, and mean-min-max ranges over the
calibration latents clip them (the bundled model decodes codebook vectors: 52 dB vs fp32 there, see
the NOTE in engines/int8.py). A broken graph lands at ~1 or above."""
CODE_FLIPS = MAX_CODE_FLIPS["int8"]
"""Share of latent positions whose code differs from fp32 torch's with the int8 encoder (the codebook
search in float32 on its latent), the bound tuning.py uses, on two unseen phantoms. Measured 0.031
(the random codebook of the tiny model; the bundled model: 0.11, bf16 there 0.034)."""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    model = modeldir.random_model("tiny", seed=3)
    model_dir = tmp_path_factory.mktemp("int8") / "model"
    modeldir.save(model_dir, model.config, model.vqgan, model.unet)
    path = int8.int8_unet_ir(model_dir, model, calibration_images=[], phantoms=PHANTOMS, runs=RUNS)
    for network in ("encoder", "decoder"):
        int8.int8_ir(model_dir, model, network, calibration_images=[], phantoms=PHANTOMS, runs=RUNS)
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
    actual = int8.compile_ir(path, "bf16")({"U": u, "t": t})[0]
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


def _held_out_vq(model):
    """Two phantoms the calibration never saw, and decoder inputs for them: their sampled latents
    (DDPM-10, one seed each), then their own (quantised) encoder latents."""
    from bsldm_fast.pipeline import Pipeline

    images, _ = int8.calibration_units(model, [], phantoms=(11, 12))
    pipeline = Pipeline.create(model.config, model.vqgan, model.unet, "cpu")
    with torch.inference_mode():
        cond = pipeline.encode(images)
        latents = torch.cat([pipeline.sample_latents(cond, [7, 8], "ddpm", 10), cond])
    return images, latents


def _codes(model, z):
    from bsldm_fast import kernels

    return kernels.vq_quantize(z, model.vqgan.quantizer.embedding.weight.detach().float())[1]


def test_int8_encoder_keeps_the_codes_on_held_out_images(built):
    model, model_dir, _ = built
    path = int8.int8_ir_path(model_dir, "encoder")
    ir = int8.require_openvino()[0].Core().read_model(str(path))
    types = {op.get_type_name() for op in ir.get_ordered_ops()}
    names = [op.get_friendly_name() for op in ir.get_ordered_ops()]
    # Quantised, and cut before the codebook search: the search never runs in int8.
    assert "FakeQuantize" in types
    assert not any(n.startswith("/quantizer/") for n in names)
    assert [o.get_names() for o in ir.outputs] == [{"latent"}]
    images, _ = _held_out_vq(model)
    with torch.inference_mode():
        z32 = LatentEncoder(model.vqgan.encoder)(images)
    compiled = int8.compile_ir(path, "bf16")
    z8 = torch.from_numpy(np.concatenate([compiled({"image": images[i:i + 1].numpy()})[0]
                                          for i in range(len(images))]))
    assert z8.shape == z32.shape
    flips = float((_codes(model, z8) != _codes(model, z32)).float().mean())
    error = relative_error(z8.numpy(), z32.numpy())
    print(f"int8 encoder vs fp32: changed codes {flips:.4f}, latent max rel {error:.4f}")
    assert flips <= CODE_FLIPS
    assert error > 1e-3  # quantised, not float


def test_int8_decoder_matches_fp32_on_held_out_latents(built):
    model, model_dir, _ = built
    path = int8.int8_ir_path(model_dir, "decoder")
    _, latents = _held_out_vq(model)
    with torch.inference_mode():
        expected = LatentDecoder(model.vqgan.decoder)(latents).numpy()
    compiled = int8.compile_ir(path, "bf16")
    actual = np.concatenate([compiled({"latent": latents[i:i + 1].numpy()})[0] for i in range(len(latents))])
    assert actual.shape == expected.shape
    errors = [relative_error(actual[i], expected[i]) for i in range(len(latents))]
    print(f"int8 decoder vs fp32 on held-out latents (sampled, sampled, own, own): max rel {errors}")
    assert max(errors[:2]) <= DECODER_TOLERANCE["sampled"]
    assert max(errors[2:]) <= DECODER_TOLERANCE["own"]
    assert min(errors) > 1e-3  # quantised, not float


def test_vq_ir_manifest_and_staleness(built, tmp_path, monkeypatch):
    model, model_dir, _ = built
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    images = int8.calibration_units(model, [], PHANTOMS)[0]
    for network in ("encoder", "decoder"):
        path = int8.int8_ir_path(copy, network)
        assert path.name == f"{network}-int8.xml" and path.with_suffix(".bin").is_file()
        key = read_manifest(path, int8.Int8Key)
        assert key.graph == network and json.loads(key.options) == int8.network_options(network)
        # The encoder reads the images only: its digest does not depend on the sampling runs.
        runs = () if network == "encoder" else RUNS
        assert key.calibration == int8.calibration_digest(images, runs)
        assert int8.calibration_record(copy, network)["network"] == network
    calls = []
    original = int8.quantize_vq
    monkeypatch.setattr(int8, "quantize_vq", lambda *a, **k: calls.append(a[1]) or original(*a, **k))
    assert int8.int8_ir(copy, model, "decoder", [], PHANTOMS, runs=RUNS) and not calls  # kept
    assert int8.int8_ir(copy, model, "encoder", [], PHANTOMS, runs=(("ddpm", 10, 5),)) and not calls
    before = read_manifest(int8.int8_ir_path(copy, "decoder"), int8.Int8Key)
    int8.int8_ir(copy, model, "decoder", [], PHANTOMS, options={"ignored": "none"}, runs=RUNS)
    assert calls == ["decoder"]  # other options: rebuilt
    after = read_manifest(int8.int8_ir_path(copy, "decoder"), int8.Int8Key)
    assert after.options != before.options and after.calibration == before.calibration


def _verdict(**passed):
    return {"networks": {n: {"passed": ok, "reason": f"test: {n} {'passed' if ok else 'PSNR +0.9 dB'}"}
                         for n, ok in passed.items()}}


def test_gate_verdict_format_and_per_network_refusal(built, tmp_path):
    model, model_dir, _ = built
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    int8.gate_path(copy).unlink(missing_ok=True)  # another test's verdict
    for network in int8.NETWORKS:
        assert "not been through the quality gate" in int8.int8_refusal(copy, network)
    int8.write_gate(copy, _verdict(unet=True, decoder=False, encoder=True))
    record = int8.int8_gate(copy)
    assert record["int8_networks"] == ["unet", "encoder"]
    for network in int8.NETWORKS:
        key = read_manifest(int8.int8_ir_path(copy, network), int8.Int8Key)
        assert record["networks"][network]["ir_key"] == dataclasses.asdict(key)
    assert record["ir_key"] == record["networks"]["unet"]["ir_key"]  # the U-Net-only format's field
    assert int8.int8_refusal(copy, "unet") is None and int8.int8_refusal(copy, "encoder") is None
    assert "VQ decoder" in int8.int8_refusal(copy, "decoder")
    assert "failed the quality gate: test: decoder PSNR +0.9 dB" in int8.int8_refusal(copy, "decoder")
    assert int8.int8_networks(copy) == ("unet", "encoder")

    # A network's IR rebuilt since the gate is refused; the others keep their verdict.
    path = int8.int8_ir_path(copy, "encoder")
    write_manifest(path, dataclasses.replace(read_manifest(path, int8.Int8Key), calibration="0" * 16))
    assert "VQ encoder" in int8.int8_refusal(copy, "encoder")
    assert "changed since its quality gate" in int8.int8_refusal(copy, "encoder")
    assert int8.int8_networks(copy) == ("unet",)
    # A verdict that does not name a network has not judged it.
    int8.write_gate(copy, _verdict(unet=True))
    assert "not been through the quality gate" in int8.int8_refusal(copy, "decoder")
    # A missing IR is said so, per network.
    int8.int8_ir_path(copy, "decoder").unlink()
    assert "no int8 VQ decoder" in int8.int8_refusal(copy, "decoder")


def test_the_runner_runs_each_network_int8_only_where_the_gate_passed_it(built, tmp_path, caplog):
    from bsldm_fast.engines.openvino import OpenVINORunner

    model, model_dir, _ = built
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    images, latents = _held_out_vq(model)
    images, latents = images[:2], latents[:2]
    bf16 = OpenVINORunner(model.config, model.vqgan, model.unet, "bf16", copy)
    assert bf16.int8_networks == () and bf16.int8_refusal is None
    with torch.inference_mode():
        decoded = {"bf16": bf16.decode(latents).numpy()}
        latent = {"bf16": bf16._run("encoder", {"image": images}).numpy()}
    ir = {network: int8.compile_ir(int8.int8_ir_path(copy, network), "bf16") for network in ("encoder", "decoder")}
    decoded["int8"] = np.concatenate([ir["decoder"]({"latent": latents[i:i + 1].numpy()})[0] for i in range(2)])
    latent["int8"] = np.concatenate([ir["encoder"]({"image": images[i:i + 1].numpy()})[0] for i in range(2)])
    assert relative_error(decoded["int8"], decoded["bf16"]) > 1e-3  # the two paths are told apart

    def used(runner):
        """Which path each VQ network took: the int8 IR's output or the bf16 graph's."""
        with torch.inference_mode():
            d = runner.decode(latents).numpy()
            z = runner._run("encoder", {"image": images}).numpy()
        return {"decoder": "int8" if relative_error(d, decoded["int8"]) < relative_error(d, decoded["bf16"]) else "bf16",
                "encoder": "int8" if relative_error(z, latent["int8"]) < relative_error(z, latent["bf16"]) else "bf16"}

    int8.write_gate(copy, _verdict(unet=True, decoder=False, encoder=True))
    with caplog.at_level("WARNING"):
        runner = OpenVINORunner(model.config, model.vqgan, model.unet, "int8", copy)
    assert runner.int8_networks == ("unet", "encoder") and runner.int8_refusal is None
    assert "failed the quality gate" in runner.int8_refusals["decoder"]
    assert "running the decoder in bf16, not int8" in caplog.text and "decoder PSNR +0.9 dB" in caplog.text
    assert used(runner) == {"decoder": "bf16", "encoder": "int8"}
    codes = runner.encode(images)  # the float32 search on the int8 latent: codebook vectors
    assert bool(torch.isin(codes.permute(0, 2, 3, 1).reshape(-1, 4), runner.codes).all())

    int8.write_gate(copy, _verdict(unet=False, decoder=True, encoder=False))
    caplog.clear()
    with caplog.at_level("WARNING"):
        runner = OpenVINORunner(model.config, model.vqgan, model.unet, "int8", copy)
    assert runner.int8_networks == ("decoder",) and "unet PSNR" in runner.int8_refusal
    assert used(runner) == {"decoder": "int8", "encoder": "bf16"}

    int8.write_gate(copy, _verdict(unet=False, decoder=False, encoder=False))
    caplog.clear()
    with caplog.at_level("WARNING"):
        runner = OpenVINORunner(model.config, model.vqgan, model.unet, "int8", copy)
    assert runner.int8_networks == () and "every network runs in bf16" in caplog.text
    assert used(runner) == {"decoder": "bf16", "encoder": "bf16"}

    # The gate's own runner: the networks asked for, ungated.
    runner = OpenVINORunner(model.config, model.vqgan, model.unet, "int8", copy, gated=False,
                            int8_networks=["decoder"])
    assert runner.int8_networks == ("decoder",) and "not asked" in runner.int8_refusals["encoder"]
    with pytest.raises(ValueError, match="unknown int8 networks"):
        OpenVINORunner(model.config, model.vqgan, model.unet, "int8", copy, int8_networks=["vae"])
