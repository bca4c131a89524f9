"""backend='auto' on the CPU: the measured table of engines/tuning.py and the StageRunner it builds."""

from __future__ import annotations

import json

import pytest
import torch

from bsldm_fast import modeldir
from bsldm_fast.engines import runners, tuning
from bsldm_fast.pipeline import Pipeline, build_pipeline


@pytest.fixture()
def tiny_dir(tiny_model, tmp_path):
    path = tmp_path / "model"
    modeldir.save(path, tiny_model.config, tiny_model.vqgan, tiny_model.unet)
    return path


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_measure_checks_then_times_each_network(tiny_model, precision):
    rows = tuning.measure(tiny_model, precision, backends=("torch",), repeats=1)
    assert [r.network for r in rows] == list(tuning.NETWORKS)
    for row in rows:
        assert row.seconds is not None and row.seconds > 0
        assert row.rel_error <= tuning.REL_MAX_ERROR[precision]
        if precision == "fp32":
            assert row.rel_error == 0.0  # the same eager float32 runner as the reference


def test_a_runner_with_a_wrong_output_is_never_timed(tiny_model, monkeypatch):
    make = runners.make_runner

    class OffByTenPercent:
        def __init__(self, runner):
            self.runner, self.codes, self.precision, self.name = runner, runner.codes, "fp32", "off"

        def encode(self, images):
            return self.runner.encode(images)

        def denoise(self, u, t):
            return self.runner.denoise(u, t) * 1.1

        def decode(self, z):
            return self.runner.decode(z)

    def fake(config, vqgan, unet, device, precision, backend, **kwargs):
        runner = make(config, vqgan, unet, device, precision, "torch")
        return OffByTenPercent(runner) if backend == "torch-compile" else runner

    monkeypatch.setattr(runners, "make_runner", fake)
    rows = tuning.measure(tiny_model, "fp32", backends=("torch", "torch-compile"), repeats=1)
    unet = {r.backend: r for r in rows if r.network == "unet"}
    assert unet["torch"].seconds is not None
    assert unet["torch-compile"].seconds is None and "output off" in unet["torch-compile"].note
    assert unet["torch-compile"].rel_error == pytest.approx(0.1, rel=1e-3)


def _row(network, backend, seconds, precision="bf16"):
    return tuning.Measurement(network, backend, precision, 1, seconds, 1e-3 if seconds else None)


def test_fastest_reads_the_table_of_this_cpu_only(tiny_dir, monkeypatch):
    assert tuning.fastest(tiny_dir, "bf16") is None  # no table yet
    rows = [_row("encoder", "torch", 2.0), _row("encoder", "openvino", 1.0),
            _row("unet", "torch", 0.5), _row("unet", "openvino", 0.7), _row("unet", "torch-compile", None),
            _row("decoder", "torch", 3.0), _row("decoder", "openvino", 1.5)]
    path = tuning.write_table(tiny_dir, rows)
    assert tuning.fastest(tiny_dir, "bf16") == {"encoder": "openvino", "unet": "torch", "decoder": "openvino"}
    assert tuning.fastest(tiny_dir, "fp32") is None  # not measured at that precision
    # Another precision is merged in, not written over.
    tuning.write_table(tiny_dir, [_row(n, "torch", 1.0, "fp32") for n in tuning.NETWORKS])
    assert tuning.fastest(tiny_dir, "bf16")["encoder"] == "openvino"
    assert tuning.fastest(tiny_dir, "fp32") == dict.fromkeys(tuning.NETWORKS, "torch")
    # Measured on another CPU (or other versions): not used.
    key = tuning.cpu_key()
    monkeypatch.setattr(tuning, "cpu_key", lambda: {**key, "flags": key["flags"] + " amx_tile"})
    assert tuning.fastest(tiny_dir, "bf16") is None
    assert json.loads(path.read_text())["key"]["cpu"] == key["cpu"]


def test_auto_on_the_cpu_runs_each_network_on_its_table_choice(tiny_model, tiny_dir, monkeypatch, gen):
    pipe, chosen = build_pipeline(tiny_model.config, tiny_model.vqgan, tiny_model.unet, "cpu", "fp32",
                                  "auto", model_dir=tiny_dir)
    assert chosen == "torch" and isinstance(pipe.runner, runners.TorchRunner)  # no table: eager
    monkeypatch.setattr(tuning, "fastest", lambda model_dir, precision: dict.fromkeys(tuning.NETWORKS, "torch"))
    staged, chosen = build_pipeline(tiny_model.config, tiny_model.vqgan, tiny_model.unet, "cpu", "fp32",
                                    "auto", model_dir=tiny_dir)
    assert isinstance(staged.runner, runners.StageRunner)
    assert chosen == "encoder=torch,unet=torch,decoder=torch"
    images = torch.rand(2, 1, 64, 64, generator=gen) * 2 - 1
    plain = Pipeline.create(tiny_model.config, tiny_model.vqgan, tiny_model.unet)
    assert torch.equal(staged.run(images, [1, 2], "ddim", 3), plain.run(images, [1, 2], "ddim", 3))


def test_stage_runner_needs_every_network(tiny_model):
    runner = runners.make_runner(tiny_model.config, tiny_model.vqgan, tiny_model.unet)
    with pytest.raises(ValueError, match="no runner"):
        runners.StageRunner({"encoder": runner, "unet": runner})


def test_tune_command_writes_the_table(tiny_dir, capsys):
    from bsldm_fast.cli import main

    assert main(["tune", str(tiny_dir), "--backends", "torch", "--repeats", "1"]) == 0
    assert tuning.fastest(tiny_dir, "fp32") == dict.fromkeys(tuning.NETWORKS, "torch")
    assert "auto on this CPU" in capsys.readouterr().err


# int8: OpenVINO's gated int8 networks beside the other runners in bf16 -------------------------

openvino_missing = runners.backend_unavailable("openvino", torch.device("cpu"))
needs_openvino = pytest.mark.skipif(openvino_missing is not None, reason=str(openvino_missing))


def test_int8_runs_the_int8_backends_at_int8_and_every_other_runner_at_bf16():
    assert runners.runner_precision("openvino", "int8") == "int8"
    assert runners.runner_precision("torch", "int8") == "bf16"
    assert runners.runner_precision("torch-compile", "int8") == "bf16"
    assert runners.runner_precision("torch", "fp32") == "fp32"


@needs_openvino
def test_tuning_for_int8_measures_openvino_at_int8_and_torch_at_bf16(tiny_model, tiny_dir):
    # The tiny model has no int8 IR: the OpenVINO runner runs bf16 and each row says why.
    model = modeldir.load(tiny_dir)
    rows = tuning.measure(model, "int8", backends=("torch", "openvino"), repeats=1, model_dir=tiny_dir)
    by = {(r.network, r.backend): r for r in rows}
    for network in tuning.NETWORKS:
        assert by[(network, "torch")].precision == "bf16"
        assert by[(network, "openvino")].precision == "bf16"
        assert "runs bf16" in by[(network, "openvino")].note
    assert all(r.tuned_for == "int8" and r.seconds is not None for r in rows)
    # Tuned for int8, the rows neither replace nor join the bf16 table.
    tuning.write_table(tiny_dir, [_row(n, "torch", 9.0) for n in tuning.NETWORKS])
    tuning.write_table(tiny_dir, rows)
    assert tuning.fastest(tiny_dir, "bf16") == dict.fromkeys(tuning.NETWORKS, "torch")
    assert set(tuning.fastest(tiny_dir, "int8").values()) <= {"torch", "openvino"}


@needs_openvino
def test_a_stage_runner_at_int8_builds_openvino_at_int8_and_torch_at_bf16(tiny_model, tiny_dir):
    choice = {"encoder": "torch", "unet": "openvino", "decoder": "torch"}
    staged = runners.make_stage_runner(tiny_model.config, tiny_model.vqgan, tiny_model.unet, choice, "cpu",
                                       "int8", model_dir=tiny_dir)
    assert staged.runners["encoder"].precision == "bf16" and staged.runners["decoder"].precision == "bf16"
    assert staged.runners["unet"].precision == "int8" and staged.precision == "int8"
    # No int8 IR here: its U-Net runs bf16, and the runner says why.
    assert "no int8" in staged.runners["unet"].int8_refusal


@needs_openvino
def test_int8_auto_without_a_table_runs_openvino(tiny_model, tiny_dir):
    pipe, chosen = build_pipeline(tiny_model.config, tiny_model.vqgan, tiny_model.unet, "cpu", "int8",
                                  "auto", model_dir=tiny_dir)
    assert chosen == "openvino" and pipe.runner.precision == "int8"


@pytest.mark.parametrize("device, backend", [("cpu", "torch"), ("cpu", "torch-compile"), ("cuda", "auto")])
def test_int8_is_refused_where_no_int8_runner_can_run(tiny_model, device, backend):
    from bsldm_fast import Suppressor

    with pytest.raises(ValueError, match="int8"):
        build_pipeline(tiny_model.config, tiny_model.vqgan, tiny_model.unet, device, "int8", backend)
    if backend != "auto":
        with pytest.raises(ValueError, match="int8"):
            Suppressor(tiny_model, device, precision="int8", backend=backend)
