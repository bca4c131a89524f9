"""The engine cache's keys, staleness and file handling, with a fake builder standing in for TensorRT.

These are unit tests of the cache and of build orchestration only: no engine is built or run here
(tests/engines/test_tensorrt.py does that where TensorRT and a GPU exist).
"""

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from bsldm_fast.engines.cache import (EngineError, EngineKey, engine_dir, ensure_engine, find_engine,
                                      manifest_path, model_hash)
from bsldm_fast.engines.graphs import BatchProfile
from bsldm_fast.engines.onnx_export import export_model_dir
from bsldm_fast.engines.tensorrt import Target, build_engines, engine_key, engine_paths
from bsldm_fast.modeldir import random_model, save

KEY = EngineKey("unet", "fp16", "a" * 64, "10.8.0", "NVIDIA H100 80GB HBM3", "9.0", "1-1-16@8x8", 17)
H100 = Target("10.8.0", "NVIDIA H100 80GB HBM3", "9.0")


@pytest.fixture(scope="session")
def _exported(tmp_path_factory):
    """A tiny model directory with its fp16 ONNX graphs, exported once for the session."""
    model = random_model("tiny", seed=9)
    path = save(tmp_path_factory.mktemp("cache") / "m", model.config, model.vqgan, model.unet)
    export_model_dir(path, "fp16", model=model)
    return path


@pytest.fixture
def model_dir(_exported, tmp_path):
    return Path(shutil.copytree(_exported, tmp_path / "m"))


def test_every_field_changes_the_key():
    digests = {KEY.digest()}
    for field in dataclasses.fields(KEY):
        value = getattr(KEY, field.name)
        changed = dataclasses.replace(KEY, **{field.name: value + 1 if isinstance(value, int)
                                              else value + "x"})
        digests.add(changed.digest())
    assert len(digests) == 1 + len(dataclasses.fields(KEY))


def test_missing_engine_names_the_command(tmp_path):
    with pytest.raises(EngineError, match=f"build it with: bsldm-fast build-engine {tmp_path} "
                                          "--precision fp16"):
        find_engine(tmp_path, KEY)


def test_build_once_then_reuse(tmp_path):
    calls = []
    path, built = ensure_engine(tmp_path, KEY, lambda: calls.append(1) or b"plan-1")
    assert built and path.read_bytes() == b"plan-1" and path.parent == engine_dir(tmp_path)
    assert json.loads(manifest_path(path).read_text())["tensorrt_version"] == "10.8.0"
    again, built = ensure_engine(tmp_path, KEY, lambda: calls.append(1) or b"plan-2")
    assert again == path and not built and len(calls) == 1
    assert find_engine(tmp_path, KEY) == path
    _, built = ensure_engine(tmp_path, KEY, lambda: b"plan-3", force=True)
    assert built and path.read_bytes() == b"plan-3"


def test_stale_engine_says_what_changed_and_is_replaced(tmp_path):
    old, _ = ensure_engine(tmp_path, KEY, lambda: b"old")
    newer = dataclasses.replace(KEY, tensorrt_version="10.9.0", model_hash="b" * 64)
    with pytest.raises(EngineError, match=r"stale \(.*weights.*tensorrt_version 10.8.0 -> 10.9.0\).*"
                                          "rebuild it with: bsldm-fast build-engine"):
        find_engine(tmp_path, newer)
    new, built = ensure_engine(tmp_path, newer, lambda: b"new")
    assert built and new.read_bytes() == b"new"
    assert not old.exists() and not manifest_path(old).exists()


def test_other_gpus_and_precisions_are_kept(tmp_path):
    a, _ = ensure_engine(tmp_path, KEY, lambda: b"h100")
    b, _ = ensure_engine(tmp_path, dataclasses.replace(KEY, gpu_name="NVIDIA A100", compute_capability="8.0"),
                         lambda: b"a100")
    c, _ = ensure_engine(tmp_path, dataclasses.replace(KEY, precision="bf16"), lambda: b"bf16")
    assert a.exists() and b.exists() and c.exists() and len({a, b, c}) == 3


def test_failed_build_leaves_nothing_and_foreign_files_are_untouched(tmp_path):
    directory = engine_dir(tmp_path)
    directory.mkdir()
    foreign = directory / "mine.plan"  # no manifest: not ours, never used or removed
    foreign.write_bytes(b"user file")

    def failing():
        raise EngineError("builder failed")

    with pytest.raises(EngineError, match="builder failed"):
        ensure_engine(tmp_path, KEY, failing)
    assert sorted(p.name for p in directory.iterdir()) == ["mine.plan"]
    ensure_engine(tmp_path, KEY, lambda: b"plan")
    assert foreign.read_bytes() == b"user file"


def test_engine_without_manifest_is_not_trusted(tmp_path):
    path, _ = ensure_engine(tmp_path, KEY, lambda: b"plan")
    manifest_path(path).unlink()
    with pytest.raises(EngineError, match="no fp16 TensorRT engine"):
        find_engine(tmp_path, KEY)


def test_model_hash_follows_the_weights(model_dir):
    first = model_hash(model_dir)
    assert first == model_hash(model_dir)
    model = random_model("tiny", seed=10)
    save(model_dir, model.config, model.vqgan, model.unet, overwrite=True)
    assert model_hash(model_dir) != first


def fake_builder(calls):
    """Stands in for TensorRT: the 'engine' is a digest of the ONNX file it was given."""

    def build(onnx_file, spec, profile):
        calls.append((onnx_file.name, spec.name, profile))
        return hashlib.sha256(onnx_file.read_bytes()).hexdigest().encode()

    return build


def test_build_engines_builds_then_caches(model_dir):
    calls = []
    profile = BatchProfile(1, 2, 8)
    results = build_engines(model_dir, "fp16", profile, builder=fake_builder(calls), target=H100)
    assert sorted(calls) == sorted([("encoder-fp16.onnx", "encoder", profile),
                                    ("decoder-fp16.onnx", "decoder", profile),
                                    ("unet-fp16.onnx", "unet", profile)])
    for graph, (path, built) in results.items():
        assert built
        onnx_file = model_dir / "onnx" / f"{graph}-fp16.onnx"
        assert path.read_bytes() == hashlib.sha256(onnx_file.read_bytes()).hexdigest().encode()
        assert path.name.startswith(f"{graph}-fp16-")
    # Everything fresh: nothing is rebuilt, and the cache answers for this target only.
    again = build_engines(model_dir, "fp16", profile, builder=fake_builder(calls), target=H100)
    assert len(calls) == 3 and not any(built for _, built in again.values())
    config = random_model("tiny").config
    key = engine_key(model_dir, config, "unet", "fp16", profile, H100, 17)
    assert find_engine(model_dir, key) == results["unet"][0]
    with pytest.raises(EngineError, match=r"stale \(profile 1-2-8@8x8 -> 1-1-16@8x8\)"):
        find_engine(model_dir, engine_key(model_dir, config, "unet", "fp16", BatchProfile(),
                                          H100, 17))
    with pytest.raises(EngineError, match="--min-batch 2 --opt-batch 4 --max-batch 4"):
        find_engine(model_dir, engine_key(model_dir, config, "unet", "fp16", BatchProfile(2, 4, 4),
                                          H100, 17))
    a100 = Target("10.8.0", "NVIDIA A100-SXM4-80GB", "8.0")
    with pytest.raises(EngineError, match="no fp16 TensorRT engine .* on this GPU \\(NVIDIA A100"):
        find_engine(model_dir, engine_key(model_dir, config, "unet", "fp16", profile, a100, 17))


def test_new_weights_make_every_engine_stale(model_dir):
    calls = []
    build_engines(model_dir, "fp16", builder=fake_builder(calls), target=H100)
    model = random_model("tiny", seed=12)
    save(model_dir, model.config, model.vqgan, model.unet, overwrite=True)
    config = model.config
    with pytest.raises(EngineError, match="stale .*weights or config changed"):
        find_engine(model_dir, engine_key(model_dir, config, "unet", "fp16", BatchProfile(), H100, 17))
    results = build_engines(model_dir, "fp16", builder=fake_builder(calls), target=H100)
    assert len(calls) == 6 and all(built for _, built in results.values())
    assert len(list(engine_dir(model_dir).glob("*.plan"))) == 3


def test_bf16_engines_come_from_opset_22_graphs(model_dir):
    calls = []
    build_engines(model_dir, "bf16", graphs=("unet",), builder=fake_builder(calls), target=H100)
    assert calls[0][0] == "unet-bf16.onnx"
    key = engine_key(model_dir, random_model("tiny").config, "unet", "bf16", BatchProfile(), H100, 22)
    assert find_engine(model_dir, key).is_file()


def test_profile_must_be_ordered():
    with pytest.raises(ValueError, match="min <= opt <= max"):
        BatchProfile(4, 2, 16)


def test_loading_finds_what_build_engines_wrote(model_dir):
    """`load_engines` looks engines up with `engine_paths`; it must agree with the builder's keys."""
    config = random_model("tiny").config
    with pytest.raises(EngineError, match="build it with: bsldm-fast build-engine .* --precision fp16"):
        engine_paths(model_dir, config, "fp16", BatchProfile(), H100)
    built = build_engines(model_dir, "fp16", builder=fake_builder([]), target=H100)
    assert engine_paths(model_dir, config, "fp16", BatchProfile(), H100) == {
        graph: path for graph, (path, _) in built.items()}
