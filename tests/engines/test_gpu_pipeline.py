"""The CUDA-graph pipeline: its capture logic on the CPU with graphs faked, and on a GPU for real
(PSNR >= 45 dB against the eager float32 reference on the bundled sample radiographs)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bsldm_fast import kernels
from bsldm_fast.engines.runners import TorchRunner
from bsldm_fast.pipeline import CudaGraphs, Pipeline

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "assets" / "szch_samples" / "cxr"

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="CUDA graphs and the GPU pipeline need an NVIDIA GPU")


class FakeGraph:
    """Stands for a captured CUDA graph: replay runs the recorded loop, as a real replay re-runs
    its kernels on the same buffers."""

    def __init__(self, fn, log):
        self.fn = fn
        self.log = log

    def replay(self):
        self.log.append(("replay", self.fn.__self__.key))
        self.fn()


class FakeGraphs:
    """Records captures; like the real capture, it leaves the buffers' contents undefined (poisoned)."""

    def __init__(self):
        self.log = []

    def capture(self, fn):
        program = fn.__self__
        self.log.append(("capture", program.key))
        for buffer in program.buffers().values():
            if buffer.is_floating_point():
                buffer.fill_(float("nan"))
        return FakeGraph(fn, self.log)

    def count(self, kind):
        return sum(1 for k, _ in self.log if k == kind)


def _images(gen, batch, size):
    return torch.rand((batch, 1, size, size), generator=gen) * 2 - 1


@pytest.fixture(scope="module")
def cpu_runner(tiny_model):
    return TorchRunner(tiny_model.config, tiny_model.vqgan, tiny_model.unet, "cpu", "fp32")


def test_replays_match_the_uncaptured_loop_and_the_reference(tiny_model, cpu_runner, gen):
    config = tiny_model.config
    fake = FakeGraphs()
    captured = Pipeline(config, cpu_runner, "cpu", "auto", graphs=fake)
    eager = Pipeline(config, cpu_runner, "cpu", "auto", graphs=None)
    reference = Pipeline.create(config, tiny_model.vqgan, tiny_model.unet, "cpu", "fp32", "reference")
    images = _images(gen, 2, config.image_size)
    seeds = [int(s) for s in torch.randint(0, 2**31, (2,), generator=gen)]
    for sampler, steps in (("dpmpp", 4), ("ddpm", 5), ("ddim", 3)):
        out = captured.run(images, seeds, sampler, steps)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, eager.run(images, seeds, sampler, steps), rtol=0, atol=0)
        expected = reference.run(images, seeds, sampler, steps)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_buffers_are_allocated_once_and_replays_reuse_them(tiny_model, cpu_runner, gen):
    config = tiny_model.config
    fake = FakeGraphs()
    pipe = Pipeline(config, cpu_runner, "cpu", "auto", graphs=fake)
    eager = Pipeline(config, cpu_runner, "cpu", "auto", graphs=None)
    first = _images(gen, 2, config.image_size)
    pipe.run(first, [1, 2], "dpmpp", 3)
    program = next(iter(pipe.programs.values()))
    pointers = {name: b.data_ptr() for name, b in program.buffers().items()}
    outputs = []
    for seeds in ([1, 2], [3, 4], [3, 4]):
        images = _images(gen, 2, config.image_size)
        out = pipe.run(images, seeds, "dpmpp", 3)
        # New inputs are read from the static buffers on every replay.
        torch.testing.assert_close(out, eager.run(images, seeds, "dpmpp", 3), rtol=0, atol=0)
        outputs.append(out)
    assert {name: b.data_ptr() for name, b in program.buffers().items()} == pointers
    assert fake.count("capture") == 1 and fake.count("replay") == 4
    assert len(pipe.programs) == 1
    # The returned tensor is a copy: a later replay does not change an earlier result.
    assert outputs[0].data_ptr() != program.out.data_ptr()
    assert not torch.equal(outputs[0], outputs[1])


def test_each_batch_steps_sampler_key_captures_its_own_graph(tiny_model, cpu_runner, gen):
    config = tiny_model.config
    fake = FakeGraphs()
    pipe = Pipeline(config, cpu_runner, "cpu", "auto", graphs=fake)
    runs = [(1, "dpmpp", 3), (2, "dpmpp", 3), (1, "dpmpp", 4), (1, "ddim", 3), (1, "dpmpp", 3),
            (2, "dpmpp", 3)]
    for batch, sampler, steps in runs:
        pipe.run(_images(gen, batch, config.image_size), list(range(batch)), sampler, steps)
    assert fake.count("capture") == 4
    assert fake.count("replay") == len(runs)
    assert {(k.batch, k.sampler, k.steps) for k in pipe.programs} == set(runs)
    pipe.run(_images(gen, 1, config.image_size), [0], "dpmpp", 3, offset_noise=True)
    assert fake.count("capture") == 5  # offset noise changes x_T: another graph


def test_each_sample_is_independent_of_its_batch(tiny_model, cpu_runner, gen):
    config = tiny_model.config
    images = _images(gen, 2, config.image_size)
    both = Pipeline(config, cpu_runner, "cpu", "auto", graphs=FakeGraphs()).run(images, [7, 7], "ddpm", 4)
    alone = Pipeline(config, cpu_runner, "cpu", "auto", graphs=FakeGraphs()).run(images[1:], [7], "ddpm", 4)
    torch.testing.assert_close(both[1:], alone, rtol=1e-5, atol=1e-5)


def test_a_smaller_batch_is_padded_into_a_captured_one(tiny_model, cpu_runner, gen):
    config = tiny_model.config
    fake = FakeGraphs()
    pipe = Pipeline(config, cpu_runner, "cpu", "auto", graphs=fake)
    eager = Pipeline(config, cpu_runner, "cpu", "auto", graphs=None)
    pipe.run(_images(gen, 3, config.image_size), [1, 2, 3], "ddim", 3)
    images = _images(gen, 2, config.image_size)
    out = pipe.run(images, [4, 5], "ddim", 3)
    assert out.shape[0] == 2 and fake.count("capture") == 1 and len(pipe.programs) == 1
    torch.testing.assert_close(out, eager.run(images, [4, 5], "ddim", 3), rtol=1e-5, atol=1e-5)
    pipe.run(images, [4, 5], "ddim", 4)  # other steps: a graph of its own
    assert fake.count("capture") == 2


def test_bad_inputs_are_refused(tiny_model, cpu_runner):
    config = tiny_model.config
    pipe = Pipeline(config, cpu_runner, "cpu", graphs=None)
    with pytest.raises(ValueError, match="expected images"):
        pipe.run(torch.zeros(1, 1, 8, 8), [0])
    with pytest.raises(ValueError, match="seeds"):
        pipe.run(torch.zeros(2, 1, config.image_size, config.image_size), [0])
    with pytest.raises(ValueError, match="sampler"):
        pipe.run(torch.zeros(1, 1, config.image_size, config.image_size), [0], "euler")
    with pytest.raises(ValueError, match="CUDA"):
        CudaGraphs("cpu")  # real graphs on the CPU


def test_runner_leaves_the_callers_model_unchanged(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.unet.state_dict().items()}
    runner = TorchRunner(tiny_model.config, tiny_model.vqgan, tiny_model.unet, "cpu", "bf16")
    assert runner.modules["unet"].unet is not tiny_model.unet
    for key, value in tiny_model.unet.state_dict().items():
        assert value.is_contiguous() and torch.equal(value, before[key])
    # A caller's model already in bf16 needs no conversion, but channels-last is still not
    # applied to it in place.
    import copy

    mine = copy.deepcopy(tiny_model.unet).bfloat16()
    runner = TorchRunner(tiny_model.config, tiny_model.vqgan, mine, "cpu", "bf16")
    assert runner.modules["unet"].unet is not mine
    assert all(p.is_contiguous() for p in mine.parameters())
    with pytest.raises(ValueError, match="compile_mode"):
        TorchRunner(tiny_model.config, tiny_model.vqgan, tiny_model.unet, "cpu", "fp32",
                    compile=True, compile_mode="reduce-overhead")


# On a GPU, for real ---------------------------------------------------------------------------


def _psnr(reference: torch.Tensor, test: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] mapped to display [0, 1], peak 1."""
    a = ((reference.double() + 1) / 2).clamp(0, 1)
    b = ((test.double() + 1) / 2).clamp(0, 1)
    mse = torch.mean((a - b) ** 2).item()
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def sample_batch(size: int) -> torch.Tensor:
    """The bundled 1024² sample radiographs at the model's size, as a batch in [-1, 1]."""
    from PIL import Image

    arrays = [np.asarray(Image.open(p).convert("L").resize((size, size), Image.BILINEAR), np.float32) / 255
              for p in sorted(SAMPLES.glob("*.png"))]
    return torch.from_numpy(np.stack(arrays))[:, None] * 2 - 1


def psnr_model():
    """The trained demo model when it is bundled (meaningful latents), else a random paper-size model."""
    from bsldm_fast.modeldir import DEMO_DIR, load, random_model

    if (DEMO_DIR / "config.json").is_file():
        return load(DEMO_DIR)
    return random_model("paper", seed=11)


@pytest.fixture(scope="module")
def gpu_model():
    return psnr_model()


@needs_cuda
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_gpu_pipeline_matches_the_fp32_reference(gpu_model, precision):
    model, device = gpu_model, torch.device("cuda")
    images = sample_batch(model.config.image_size).to(device)
    seeds = [11, 12, 13][: images.shape[0]]
    reference = Pipeline.create(model.config, model.vqgan, model.unet, device, "fp32", "reference")
    # Exact float32 convolutions in the reference, TF32 off.
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        expected = torch.cat([reference.run(images[i : i + 1], seeds[i : i + 1])
                              for i in range(images.shape[0])])
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    del reference
    runner = TorchRunner(model.config, model.vqgan, model.unet, device, precision)
    pipe = Pipeline(model.config, runner, device, "auto", graphs=CudaGraphs(device))
    out = torch.cat([pipe.run(images[i : i + 1], seeds[i : i + 1]) for i in range(images.shape[0])])
    assert pipe.step_backend in ("triton", "cuda")
    assert all(p.graph is not None for p in pipe.programs.values())
    for i in range(images.shape[0]):
        value = _psnr(expected[i], out[i])
        assert value >= 45.0, f"sample {i}: PSNR {value:.1f} dB < 45 dB ({precision})"
    # The replay equals the same loop run eagerly on the same buffers (up to cuDNN's choices).
    eager = Pipeline(model.config, runner, device, pipe.step_backend, graphs=None)
    again = eager.run(images[:1], seeds[:1])
    assert _psnr(again[0], out[0]) >= 55.0


@needs_cuda
def test_replays_follow_new_inputs_on_the_gpu(tiny_model, gen):
    config, device = tiny_model.config, torch.device("cuda")
    runner = TorchRunner(config, tiny_model.vqgan, tiny_model.unet, device, "fp32")
    pipe = Pipeline(config, runner, device, "auto", graphs=CudaGraphs(device))
    eager = Pipeline(config, runner, device, "auto", graphs=None)
    for seeds in ([1, 2], [3, 4]):
        images = _images(gen, 2, config.image_size).to(device)
        out = pipe.run(images, seeds, "ddpm", 6)
        torch.testing.assert_close(out, eager.run(images, seeds, "ddpm", 6), rtol=1e-4, atol=1e-4)
    assert len(pipe.programs) == 1
    assert kernels.resolve("auto", device) == pipe.step_backend


def test_quantized_sample_matches_the_reference_and_the_plain_pipeline(tiny_model, cpu_runner, gen):
    """`diffusion.quantize_sample`: the sampled latent snapped to the codebook before decoding, in
    the CPU Pipeline and in the graph pipeline alike, and the same as doing it by hand."""
    import dataclasses

    diffusion = dataclasses.replace(tiny_model.config.diffusion, quantize_sample=True)
    config = tiny_model.config.replace(diffusion=diffusion)
    codes = tiny_model.vqgan.quantizer.embedding.weight
    images = _images(gen, 2, config.image_size)
    seeds = [int(x) for x in torch.randint(0, 2**31 - 1, (2,), generator=gen)]
    plain = Pipeline.create(tiny_model.config, tiny_model.vqgan, tiny_model.unet, "cpu", "fp32", "reference")
    latents = plain.sample_latents(plain.encode(images), seeds, "ddpm", 4)
    by_hand = plain.decode(kernels.vq_quantize(latents, codes, backend="reference")[0])
    quantized = Pipeline.create(config, tiny_model.vqgan, tiny_model.unet, "cpu", "fp32", "reference")
    torch.testing.assert_close(quantized.run(images, seeds, "ddpm", 4), by_hand, rtol=0, atol=1e-6)
    graph = Pipeline(config, cpu_runner, "cpu", "auto", graphs=FakeGraphs())
    torch.testing.assert_close(graph.run(images, seeds, "ddpm", 4), by_hand, rtol=1e-4, atol=1e-4)
    assert (by_hand - plain.decode(latents)).abs().max() > 1e-3  # quantising changed the image
    without_codes = SimpleNamespace(name="stub", precision="fp32", codes=None)
    with pytest.raises(ValueError, match="codebook"):
        Pipeline(config, without_codes, "cpu", "auto")
