"""TensorRT engines against the PyTorch networks (where TensorRT and a GPU exist), and the parts of
the quantisation path that run without them."""

import numpy as np
import pytest
import torch

from bsldm_fast.config import preset
from bsldm_fast.engines import quantize
from bsldm_fast.engines.cache import EngineError
from bsldm_fast.engines.graphs import GRAPH_NAMES, graph_spec
from bsldm_fast.engines.onnx_export import relative_error, torch_reference
from bsldm_fast.engines.tensorrt import available, build_engines, load_engines
from bsldm_fast.io import write_image
from bsldm_fast.modeldir import random_model, save

needs_tensorrt = pytest.mark.skipif(
    not available(),
    reason="TensorRT and an NVIDIA GPU are needed: TensorRT comes from NVIDIA's package index, "
           "which the development and CI machines cannot reach, and they have no GPU",
)


@needs_tensorrt
@pytest.mark.parametrize("precision, tolerance", [("fp16", 2e-2), ("bf16", 5e-2)])
def test_engines_match_pytorch(tmp_path, gen, precision, tolerance):
    model = random_model("tiny", seed=5)
    save(tmp_path, model.config, model.vqgan, model.unet)
    build_engines(tmp_path, precision)
    engines = load_engines(tmp_path, precision)
    for graph in GRAPH_NAMES:
        feeds = graph_spec(graph, model.config).sample_inputs(3, gen)
        expected = torch_reference(graph, model, feeds).numpy()
        cuda = {k: v.cuda() for k, v in feeds.items()}
        if graph == "unet":
            actual = engines.denoiser(cuda["U"], cuda["t"])
        elif graph == "encoder":
            actual = engines.vqgan.encode_latent(cuda["image"])
        else:
            actual = engines.vqgan.decode(cuda["latent"])
        assert actual.dtype == torch.float32
        assert relative_error(actual.cpu().numpy(), expected) <= tolerance, graph


def test_calibration_feeds_are_the_denoiser_inputs_of_sampling(gen):
    model = random_model("tiny", seed=6)
    images = torch.rand(2, 1, 64, 64, generator=gen) * 2 - 1
    feeds = quantize.calibration_feeds(model, images, steps=3)
    assert feeds["U"].shape == (2 * 3, 8, 8, 8) and feeds["t"].dtype == np.int64
    # The CXR half of every recorded input is the encoded image; timesteps are the schedule's.
    cond = model.vqgan.encode_latent(images).detach().numpy()
    np.testing.assert_array_equal(feeds["U"][:, 4:], np.concatenate([cond] * 3))
    assert sorted(set(feeds["t"].tolist()), reverse=True)[0] == 999


def test_calibration_images_load_at_model_resolution(tmp_path):
    rng = np.random.default_rng()
    write_image(tmp_path / "a.png", rng.integers(0, 256, (80, 70), dtype=np.uint8))
    write_image(tmp_path / "b.png", rng.integers(0, 65536, (64, 64), dtype=np.uint16))
    config = preset("tiny").replace(image_size=64)
    images = quantize.load_calibration_images([tmp_path], config)
    assert images.shape == (2, 1, 64, 64) and images.min() >= -1 and images.max() <= 1
    with pytest.raises(EngineError, match="calibration images: .*no such file"):
        quantize.load_calibration_images([tmp_path / "none"], config)


def test_fp8_without_modelopt_is_refused_clearly(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_modelopt(name, *args, **kwargs):
        if name.startswith("modelopt"):
            raise ImportError("No module named 'modelopt'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_modelopt)
    model = random_model("tiny", seed=7)
    save(tmp_path, model.config, model.vqgan, model.unet)
    write_image(tmp_path / "cal.png", np.zeros((64, 64), dtype=np.uint8))
    with pytest.raises(EngineError, match="nvidia-modelopt"):
        quantize.quantized_unet_onnx(tmp_path, model, "fp8", [tmp_path / "cal.png"])
    with pytest.raises(EngineError, match="--calibration-images"):
        quantize.quantized_unet_onnx(tmp_path, model, "fp8", [])
