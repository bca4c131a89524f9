"""Whole runs: CLI to exported model, exact resume, and DDP on the CPU (gloo, 2 processes)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from bsldm_fast import Suppressor
from bsldm_fast.training import checkpoint, distributed, trainer
from train_helpers import ddp_worker, make_pairs, perturb, tiny32_model, tiny_config

ROOT = Path(__file__).resolve().parents[2]


def _train_py():
    spec = importlib.util.spec_from_file_location("train_py", ROOT / "training" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_trains_both_stages_into_a_model_suppressor_loads(pairs, tmp_path, capsys):
    main = _train_py().main
    model = tiny32_model(tmp_path)
    common = ["--data", str(pairs), "--model", model, "--batch-size", "2", "--workers", "0",
              "--max-steps", "2", "--val-every", "1", "--val-samples", "1", "--val-steps", "3",
              "--no-progress", "--device", "cpu"]
    assert main(["vqgan", *common, "--out", str(tmp_path / "vq"), "--perceptual-weights", "random"]) == 0
    assert main(["ldm", *common, "--out", str(tmp_path / "ldm"), "--vqgan", str(tmp_path / "vq"),
                 "--condition-scaling", "original", "--epochs", "1", "--max-steps", "0"]) == 0
    out = capsys.readouterr().out
    assert '"condition_scaling": "original"' in out  # the resolved config is printed ...
    saved = json.loads((tmp_path / "ldm" / "train_config.json").read_text())  # ... and saved
    assert saved["condition_scaling"] == "original" and saved["lr"] == 2e-4
    exported = json.loads((tmp_path / "ldm" / "model" / "config.json").read_text())
    assert exported["diffusion"]["condition_scaling"] == "original" and exported["image_size"] == 32
    s = Suppressor.from_pretrained(tmp_path / "ldm" / "model", device="cpu", steps=3)
    soft = s(np.full((40, 36), 30000, np.uint16))
    assert soft.shape == (40, 36) and soft.dtype == np.uint16
    # The LDM reuses the VQGAN run's split, and validation ran (a metric row in the CSV log).
    assert (pairs / "train_set.txt").is_file()
    log = (tmp_path / "ldm" / "log.csv").read_text()
    assert ",val," in log and "psnr" in log and "bsr" in log


def test_cli_stops_without_perceptual_weights(pairs, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("BSLDM_PERCEPTUAL_WEIGHTS", raising=False)
    assert _train_py().main(["vqgan", "--data", str(pairs), "--out", str(tmp_path / "r")]) == 2
    assert "--no-perceptual" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / checkpoint.STATE_TENSORS))


@pytest.mark.parametrize("stage,accum,steps", [("ldm", 2, 5), ("vqgan", 1, 3)])
def test_resume_continues_bit_identically(tmp_path, tiny_vqgan_dir, stage, accum, steps):
    pairs = make_pairs(tmp_path / "data", count=10, size=32)  # 9 training pairs
    model = tiny32_model(tmp_path)
    extra = {"vqgan": str(tiny_vqgan_dir)} if stage == "ldm" else {}
    if stage == "ldm":
        # The LDM needs a VQGAN of its resolution: a random one at 32 px.
        from bsldm_fast.config import ModelConfig
        from bsldm_fast.modeldir import random_model
        from bsldm_fast.training.stages import save_vqgan

        m = random_model(ModelConfig.load(model), seed=2)
        extra["vqgan"] = str(save_vqgan(tmp_path / "vq32", m.config, m.vqgan, False))
    options = dict(model=model, grad_accum=accum, epochs=3, max_steps=steps, checkpoint_every_steps=2,
                   keep_checkpoints=0, augment=True, **extra)
    trainer.train(tiny_config(stage, pairs, tmp_path / "a", **options))
    a = tmp_path / "a" / "checkpoints"
    # Resume from step 2 (mid-epoch) in a fresh run folder and go on to the same final step.
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(a / "step-00000002", tmp_path / "b" / "checkpoints" / "step-00000002")
    (tmp_path / "b" / "checkpoints" / "latest").write_text("step-00000002\n")
    trainer.train(tiny_config(stage, pairs, tmp_path / "b", resume="auto", **options))
    final = f"step-{steps:08d}"
    ta, tb = _tensors(a / final), _tensors(tmp_path / "b" / "checkpoints" / final)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
    sa = checkpoint.load(a / final)
    sb = checkpoint.load(tmp_path / "b" / "checkpoints" / final)
    for key in ("epoch", "micro", "step"):
        assert sa[key] == sb[key]
    assert sa["rng"]["python"] == sb["rng"]["python"] and torch.equal(sa["rng"]["torch"], sb["rng"]["torch"])
    # ... and the run did move: the weights of step 2 and the final step differ.
    t2 = _tensors(a / "step-00000002")
    assert any(not torch.equal(t2[k], ta[k]) for k in t2 if t2[k].is_floating_point())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_on_two_cpu_processes_matches_one(tmp_path, tiny_vqgan_dir):
    import torch.multiprocessing as mp

    from bsldm_fast.config import ModelConfig
    from bsldm_fast.modeldir import random_model
    from bsldm_fast.training.data import PairedDataset, paired_names
    from bsldm_fast.training.stages import save_vqgan

    pairs = make_pairs(tmp_path / "data", count=9, size=32)  # 8 training pairs
    model = tiny32_model(tmp_path)
    m = random_model(ModelConfig.load(model), seed=2)
    vq = save_vqgan(tmp_path / "vq32", m.config, m.vqgan, False)
    options = dict(model=model, vqgan=str(vq), batch_size=4, max_steps=2, keep_checkpoints=0)

    # One process: gradients of a batch of 4, then a 2-step run with batch 4.
    config = tiny_config("ldm", pairs, tmp_path / "single", **options)
    ctx = distributed.Context(0, 1, 0, torch.device("cpu"))
    model_config, vqgan = trainer.model_config_for(config)
    stage = trainer.build(config, ctx, 10, model_config, vqgan)
    perturb(stage.unet, model_config)
    ds = PairedDataset(pairs, paired_names(pairs)[:4], size=32)
    items = [ds[i] for i in range(4)]
    batch = {"cxr": torch.stack([c for c, _, _ in items]), "bs": torch.stack([b for _, b, _ in items]),
             "index": torch.tensor([7, 2, 5, 0])}  # any sample indices: the noise is keyed by them
    stage.train_step((batch["cxr"], batch["bs"], batch["index"]), epoch=0)
    expected = {n: p.grad.clone() for n, p in stage.unet.named_parameters()}
    trainer._train(config, ctx)

    # Two processes, batch 2 each, the same library calls.
    batch_file = tmp_path / "batch.safetensors"
    save_file(batch, str(batch_file))
    ddp_options = dict(options, data=str(pairs), out=str(tmp_path / "ddp"))
    mp.spawn(ddp_worker, args=(2, _free_port(), ddp_options, str(batch_file), str(tmp_path)), nprocs=2)

    for rank in range(2):
        grads = load_file(str(tmp_path / f"grads-{rank}.safetensors"))
        for name, g in expected.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-7, msg=name)
    # The full runs: rank 0 alone saved, and the weights agree with the single process's.
    single = _tensors(tmp_path / "single" / "checkpoints" / "step-00000002")
    ddp = _tensors(tmp_path / "ddp" / "checkpoints" / "step-00000002")
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == ["latest", "step-00000002"]
    # NOTE: Adam's first updates are about lr * sign(g), so where |g| is within rounding of its eps
    # a reduction-order difference can move a weight by a fraction of lr; the gradients themselves
    # are compared tightly above. Allowed: a tenth of the total movement of 2 steps at lr 2e-4.
    tolerance = 0.1 * 2 * 2e-4
    for key in single:
        if single[key].is_floating_point():
            torch.testing.assert_close(ddp[key], single[key], rtol=0, atol=tolerance, msg=key)
    assert (tmp_path / "ddp" / "model" / "unet.safetensors").is_file()


def test_engine_data_trains_on_crops_and_the_export_names_its_real_pairs(tmp_path):
    """A data-engine folder (engine.json names the real pairs) trained on random crops: both exports
    record the real pairs in training_data.json, the LDM's with its VQGAN's."""
    from bsldm_fast.data import engine

    from bsldm_fast.config import preset
    from bsldm_fast.io import read_image

    real = make_pairs(tmp_path / "real", count=2, size=64)
    pairs = [tuple(read_image(real / kind / f"{i:03d}.png") / 255.0 for kind in ("CXR", "BS"))
             for i in range(2)]
    data = tmp_path / "engine"
    engine.write_dataset(engine.Engine(pairs, size=64), data, count=6, progress=False)
    (data / "engine.json").write_text(json.dumps({"train": ["a", "b"]}))
    model = tmp_path / "tiny64.json"
    model.write_text(preset("tiny").replace(image_size=64).to_json())
    main = _train_py().main
    common = ["--data", str(data), "--model", str(model), "--batch-size", "2",
              "--workers", "0", "--max-steps", "2", "--val-every", "0", "--no-progress",
              "--device", "cpu", "--crop-size", "32"]
    assert main(["vqgan", *common, "--out", str(tmp_path / "vq"), "--perceptual-weights", "random"]) == 0
    record = json.loads((tmp_path / "vq" / "model" / trainer.TRAINING_DATA_FILE).read_text())
    assert record["real_pairs"] == ["a", "b"]
    (data / "engine.json").write_text(json.dumps({"train": ["c"]}))
    assert main(["ldm", *common, "--out", str(tmp_path / "ldm"), "--vqgan", str(tmp_path / "vq")]) == 0
    record = json.loads((tmp_path / "ldm" / "model" / trainer.TRAINING_DATA_FILE).read_text())
    assert record["real_pairs"] == ["a", "b", "c"]
    assert record["stages"]["vqgan"]["real_pairs"] == ["a", "b"]


def test_crop_size_larger_than_the_image_is_refused(pairs):
    from bsldm_fast.training.data import PairedDataset

    with pytest.raises(ValueError, match="crop_size"):
        PairedDataset(pairs, ["000.png"], 32, crop_size=33)


def test_resume_may_change_the_input_normalisation_but_not_the_network(tmp_path, tiny_vqgan_dir):
    """No weight depends on the input normalisation or on dynamic clipping (training never clips),
    so a run resumes with other ones, and the export carries them; a change of the network itself
    is still refused."""
    import dataclasses

    from bsldm_fast.config import InputNormalization, preset

    pairs = make_pairs(tmp_path / "data", count=6, size=64)
    model = tmp_path / "tiny.json"
    model.write_text(preset("tiny").to_json())
    options = dict(model=str(model), vqgan=str(tiny_vqgan_dir), max_steps=1, checkpoint_every_steps=1)
    trainer.train(tiny_config("ldm", pairs, tmp_path / "run", **options))
    norm = InputNormalization("percentile", low_value=0.05, high_value=0.95)
    clip = dataclasses.replace(preset("tiny").diffusion, clip_range_start=2.7)
    model.write_text(preset("tiny").replace(input_normalization=norm, diffusion=clip).to_json())
    trainer.train(tiny_config("ldm", pairs, tmp_path / "run", resume="auto", **{**options, "max_steps": 2}))
    exported = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert exported["input_normalization"]["mode"] == "percentile"
    assert exported["diffusion"]["clip_range_start"] == 2.7
    model.write_text(preset("tiny").replace(unet=preset("tiny").unet.__class__(
        **{**preset("tiny").unet.__dict__, "num_res_blocks": 2})).to_json())
    with pytest.raises(checkpoint.CheckpointError, match="another model config"):
        trainer.train(tiny_config("ldm", pairs, tmp_path / "run", resume="auto", **{**options, "max_steps": 3}))
