"""OpenVINORunner against the float32 PyTorch path on the CPU (tiny model, fresh random inputs).

Errors are max |err| / max |ref| (`onnx_export.relative_error`). Bounds come from measurements on
the tiny, small and bundled demo models (OpenVINO 2026.4.1, an AVX-512 BF16 CPU), with margin:
- fp32, every graph: measured <= 1.2e-6; bound 1e-4 (`CHECK_TOLERANCE`, the bound for any float32
  graph).
- bf16 U-Net: measured 5.8e-3..7.7e-3 (PyTorch's own bf16 U-Net: 6.7e-3..9.5e-3); bound 2e-2.
  Without the float32 timestep embedding it measured 7e-2 with t near 999, which these inputs
  include, so the bound catches that regression.
- bf16 decoder: measured 3.1e-3..4.6e-3 (PyTorch bf16: 5.5e-3..7.3e-3); bound 2e-2.
- bf16 encoder: the latent before quantisation, measured 5.6e-3..6.3e-3, bound 2e-2; the codes may
  differ from float32's only where that latent's own error allows it (triangle inequality: the
  chosen code is at most 2 |z_bf16 - z_fp32| farther from z_fp32 than the nearest), exact, not tuned.
- Pipeline end to end (10 DDPM steps) against the fp32 PyTorch pipeline, same seeds. fp32: measured
  5.6e-7..9.3e-7, bound 1e-4. bf16: measured 6.1e-3..6.5e-3 (PyTorch's bf16 pipeline: 1.1e-2..1.1e-1,
  as a near-tie code flip in the condition moves the whole sample); bounded by the house rule,
  2x PyTorch bf16's own error + 1e-2.
"""

import copy
import logging
import zlib

import pytest
import torch

from bsldm_fast.engines.cache import EngineError
from bsldm_fast.engines.graphs import GRAPH_NAMES, graph_spec
from bsldm_fast.engines.onnx_export import CHECK_TOLERANCE, relative_error, torch_reference
from bsldm_fast.engines.openvino import runtime_precisions
from bsldm_fast.engines.runners import choose_backend, make_runner
from bsldm_fast.models.latent import LatentEncoder
from bsldm_fast.pipeline import Pipeline
from openvino_marks import native_bf16, needs_openvino



BF16_BOUND = {"unet": 2e-2, "decoder": 2e-2, "encoder": 2e-2}


@pytest.fixture(scope="module")
def runners(tiny_model):
    return {precision: make_runner(tiny_model.config, tiny_model.vqgan, tiny_model.unet, "cpu",
                                   precision, "openvino") for precision in ("fp32", "bf16")}


def _call(runner, graph, feeds):
    with torch.inference_mode():
        if graph == "encoder":
            return runner.encode(feeds["image"])
        if graph == "unet":
            return runner.denoise(feeds["U"], feeds["t"])
        return runner.decode(feeds["latent"])


def _feeds(model, graph, batch, gen):
    feeds = graph_spec(graph, model.config).sample_inputs(batch, gen)
    if graph == "unet":
        feeds["t"][:2] = torch.tensor([999, 998])  # where a bf16 timestep embedding goes wrong
    return feeds


@needs_openvino
@pytest.mark.parametrize("graph", GRAPH_NAMES)
def test_fp32_graphs_match_pytorch(runners, tiny_model, graph, gen):
    feeds = _feeds(tiny_model, graph, 3, gen)
    out = _call(runners["fp32"], graph, feeds)
    assert out.dtype == torch.float32
    # The CPU plugin's default hint is bf16 on CPUs that have it: 'fp32' must turn it off.
    compiled = runners["fp32"].request(graph, 3).get_compiled_model()
    assert "bf16" not in {precision for _, precision in runtime_precisions(compiled)}
    assert relative_error(out.numpy(), torch_reference(graph, tiny_model, feeds).numpy()) <= CHECK_TOLERANCE


@needs_openvino
@pytest.mark.parametrize("graph", ["unet", "decoder"])
def test_bf16_graphs_match_pytorch(runners, tiny_model, graph, gen):
    feeds = _feeds(tiny_model, graph, 3, gen)
    out = _call(runners["bf16"], graph, feeds)
    assert out.dtype == torch.float32
    if native_bf16():
        compiled = runners["bf16"].request(graph, 3).get_compiled_model()
        assert runtime_precisions(compiled).get(("Convolution", "bf16"), 0) > 0
    assert relative_error(out.numpy(), torch_reference(graph, tiny_model, feeds).numpy()) <= BF16_BOUND[graph]


@needs_openvino
def test_bf16_encoder_flips_codes_only_at_near_ties(runners, tiny_model, gen):
    runner = runners["bf16"]
    images = _feeds(tiny_model, "encoder", 3, gen)["image"]
    with torch.inference_mode():
        z32 = LatentEncoder(tiny_model.vqgan.encoder)(images)
    z16 = runner._run("encoder", {"image": images})  # the latent before quantisation
    assert relative_error(z16.numpy(), z32.numpy()) <= BF16_BOUND["encoder"]
    chosen = runner.encode(images)
    codes = runner.codes
    # Distances from the float32 latent to the chosen code and to the nearest code, per position.
    flat32 = z32.permute(0, 2, 3, 1).reshape(-1, codes.shape[1]).double()
    to_chosen = (flat32 - chosen.permute(0, 2, 3, 1).reshape(-1, codes.shape[1]).double()).norm(dim=1)
    to_nearest = torch.cdist(flat32, codes.double()).min(dim=1).values
    allowed = 2 * (z16 - z32).permute(0, 2, 3, 1).reshape(-1, codes.shape[1]).double().norm(dim=1)
    assert bool((to_chosen - to_nearest <= allowed + 1e-5).all())


@needs_openvino
def test_timestep_input_stays_for_condition_scaling(tiny_model, gen):
    """With the original condition scaling the U-Net graph reads t besides the embedding."""
    import dataclasses

    model = copy.copy(tiny_model)
    model.config = tiny_model.config.replace(
        diffusion=dataclasses.replace(tiny_model.config.diffusion, condition_scaling="original"))
    runner = make_runner(model.config, model.vqgan, model.unet, "cpu", "fp32", "openvino")
    feeds = _feeds(model, "unet", 2, gen)
    out = _call(runner, "unet", feeds)
    assert relative_error(out.numpy(), torch_reference("unet", model, feeds).numpy()) <= CHECK_TOLERANCE
    assert "t" in {n for i in runner.request("unet", 2).model_inputs for n in i.get_names()}


@pytest.fixture(scope="module")
def sampled(tiny_model):
    """Inputs, seeds and the fp32 PyTorch pipeline's output (shared: 10 U-Net steps each)."""
    config = tiny_model.config
    gen = torch.Generator().manual_seed(zlib.crc32(__name__.encode()))
    images = torch.rand(2, 1, config.image_size, config.image_size, generator=gen) * 2 - 1
    seeds = [int(s) for s in torch.randint(0, 2**31, (2,), generator=gen)]
    reference = Pipeline.create(config, tiny_model.vqgan, tiny_model.unet, "cpu", "fp32")
    return images, seeds, reference.run(images, seeds).numpy()


@needs_openvino
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_pipeline_matches_fp32_torch(runners, tiny_model, sampled, precision):
    images, seeds, expected = sampled
    pipeline = Pipeline(tiny_model.config, runners[precision], "cpu")
    error = relative_error(pipeline.run(images, seeds).numpy(), expected)
    if precision == "fp32":
        assert error <= CHECK_TOLERANCE
    else:
        torch_bf16 = Pipeline.create(tiny_model.config, tiny_model.vqgan, tiny_model.unet, "cpu", "bf16")
        assert error <= 2 * relative_error(torch_bf16.run(images, seeds).numpy(), expected) + 1e-2


@needs_openvino
def test_cache_reuses_and_rebuilds_on_new_weights(tiny_model, tmp_path, gen, caplog):
    from bsldm_fast import modeldir
    from bsldm_fast.engines.openvino import OpenVINORunner, cache_dir

    config = tiny_model.config
    directory = modeldir.save(tmp_path / "model", config, tiny_model.vqgan, tiny_model.unet)
    latents = torch.randn(2, 4, config.latent_size, config.latent_size, generator=gen)

    first = OpenVINORunner(config, tiny_model.vqgan, tiny_model.unet, "fp32", directory)
    out = first.decode(latents)
    assert first.built[("decoder", 2)]
    blobs = sorted(cache_dir(directory).glob("*.blob"))
    assert len(blobs) == 1 and blobs[0].with_name(blobs[0].name + ".json").is_file()

    second = OpenVINORunner(config, tiny_model.vqgan, tiny_model.unet, "fp32", directory)
    assert torch.equal(second.decode(latents), out)
    assert not second.built[("decoder", 2)]

    blobs[0].write_bytes(b"not a compiled model")  # an unreadable blob is rebuilt, not fatal
    third = OpenVINORunner(config, tiny_model.vqgan, tiny_model.unet, "fp32", directory)
    assert torch.equal(third.decode(latents), out) and third.built[("decoder", 2)]

    vqgan = copy.deepcopy(tiny_model.vqgan)
    with torch.no_grad():
        next(vqgan.decoder.parameters()).mul_(1.5)
    modeldir.save(directory, config, vqgan, tiny_model.unet, overwrite=True)
    fourth = OpenVINORunner(config, vqgan, tiny_model.unet, "fp32", directory)
    with caplog.at_level(logging.INFO, logger="bsldm_fast.engines.openvino"):
        changed = fourth.decode(latents)
    assert fourth.built[("decoder", 2)]
    assert "rebuilding the OpenVINO decoder" in caplog.text and "weights or config changed" in caplog.text
    assert [p.name for p in cache_dir(directory).glob("*.blob")] != [blobs[0].name]
    assert len(list(cache_dir(directory).glob("*.blob"))) == 1
    with torch.inference_mode():
        assert relative_error(changed.numpy(), vqgan.decode(latents).numpy()) <= CHECK_TOLERANCE


def test_unavailable_says_why(monkeypatch):
    from bsldm_fast.engines import openvino

    assert "on the CPU" in openvino.openvino_unavailable(torch.device("cuda"))
    with pytest.raises(EngineError, match="backend 'openvino' cannot run: .*CPU"):
        choose_backend("openvino", torch.device("cuda"), lambda: None)

    def missing():
        raise EngineError(openvino.INSTALL_HINT)

    monkeypatch.setattr(openvino, "openvino_module", missing)
    assert "pip install 'bsldm-fast[openvino]'" in openvino.openvino_unavailable("cpu")
    with pytest.raises(EngineError, match=r"bsldm-fast\[openvino\]"):
        choose_backend("openvino", torch.device("cpu"), lambda: None)


@needs_openvino
def test_int8_without_a_gated_network_runs_bf16_everywhere_and_says_so(runners, tiny_model, gen, caplog):
    """A model with no int8 network that passed the gate (here: no model directory at all) runs
    every network as the bf16 runner does, and logs why for each."""
    from bsldm_fast.engines.openvino import OpenVINORunner

    with caplog.at_level(logging.WARNING, logger="bsldm_fast.engines.openvino"):
        runner = OpenVINORunner(tiny_model.config, tiny_model.vqgan, tiny_model.unet, "int8")
    assert runner.int8_networks == () and runners["bf16"].int8_networks == ()
    assert set(runner.int8_refusals) == {"unet", "decoder", "encoder"}
    assert all("model directory" in reason for reason in runner.int8_refusals.values())
    for network in ("unet", "decoder", "encoder"):
        assert f"running the {network} in bf16, not int8" in caplog.text
    assert "every network runs in bf16" in caplog.text
    for graph in GRAPH_NAMES:
        feeds = _feeds(tiny_model, graph, 2, gen)
        assert torch.equal(_call(runner, graph, feeds), _call(runners["bf16"], graph, feeds))
