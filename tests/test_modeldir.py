import contextlib
import dataclasses
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from bsldm_fast import Suppressor
from bsldm_fast.config import (
    MAX_ACTIVATION_BYTES,
    MAX_PARAMETERS,
    ModelConfig,
    UNetConfig,
    activation_bytes,
    parameter_count,
    preset,
    state_shapes,
)
from bsldm_fast.modeldir import Model, ModelDirError, build, load, random_model, save


def test_round_trip_gives_the_same_networks(tmp_path, gen):
    model = random_model("tiny", seed=5)
    save(tmp_path / "m", model.config, model.vqgan, model.unet)
    again = load(tmp_path / "m")
    assert again.config == model.config
    x = torch.rand(2, 1, 64, 64, generator=gen) * 2 - 1
    u = torch.randn(2, 8, 8, 8, generator=gen)
    t = torch.tensor([3, 700])
    with torch.no_grad():
        assert torch.equal(again.vqgan(x), model.vqgan(x))
        assert torch.equal(again.unet(u, t), model.unet(u, t))


def test_from_pretrained_loads_a_directory(tmp_path):
    model = random_model("tiny", seed=2)
    save(tmp_path, model.config, model.vqgan, model.unet)
    image = np.random.default_rng().integers(0, 256, (70, 70), dtype=np.uint8)
    a = Suppressor.from_pretrained(tmp_path, device="cpu", steps=3)(image)
    b = Suppressor(model, device="cpu", steps=3)(image)
    assert np.array_equal(a, b)


def test_refuses_to_overwrite(tmp_path):
    model = random_model("tiny")
    save(tmp_path, model.config, model.vqgan, model.unet)
    with pytest.raises(ModelDirError, match="refusing to overwrite"):
        save(tmp_path, model.config, model.vqgan, model.unet)
    save(tmp_path, model.config, model.vqgan, model.unet, overwrite=True)


def test_missing_pieces_are_named(tmp_path):
    with pytest.raises(ModelDirError, match="does not exist"):
        load(tmp_path / "nowhere")
    model = random_model("tiny")
    save(tmp_path, model.config, model.vqgan, model.unet)
    (tmp_path / "unet.safetensors").unlink()
    with pytest.raises(ModelDirError, match="unet.safetensors is missing"):
        load(tmp_path)


def test_mismatches_name_the_tensor_and_both_shapes(tmp_path):
    model = random_model("tiny")
    save(tmp_path, model.config, model.vqgan, model.unet)
    path = tmp_path / "unet.safetensors"
    state = load_file(str(path))
    state["out.2.weight"] = torch.zeros(5, 32, 3, 3)
    del state["time_embed.0.bias"]
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(path))
    with pytest.raises(ModelDirError) as error:
        load(tmp_path)
    message = str(error.value)
    assert "out.2.weight: file (5, 32, 3, 3) vs config (4, 32, 3, 3)" in message
    assert "time_embed.0.bias" in message and "extra.weight" in message


def test_config_errors_point_at_the_file(tmp_path):
    model = random_model("tiny")
    save(tmp_path, model.config, model.vqgan, model.unet)
    data = json.loads((tmp_path / "config.json").read_text())
    data["unet"]["bogus"] = 1
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ModelDirError, match="config.json.*bogus"):
        load(tmp_path)


def test_random_models_have_no_zero_layers():
    model = random_model("tiny", seed=1)
    for name, p in model.unet.named_parameters():
        assert p.abs().sum() > 0, name


# --- crafted model directories (issue 15, item 4) -------------------------------------------------



MEMORY_LIMIT = 3 * 1024**3
"""Address space of the subprocess that loads crafted directories: torch takes ~0.7 GiB, so a
regression that allocates for a crafted size dies with MemoryError instead of taking CI down."""


def _config_change(path, change):
    data = json.loads((path / "config.json").read_text())
    change(data)
    (path / "config.json").write_text(json.dumps(data))


def _set(section, key, value):
    def change(data):
        (data[section] if section else data)[key] = value
    return change


def _header_change(name, mutate):
    def change(path):
        data = bytearray((path / name).read_bytes())
        mutate(data)
        (path / name).write_bytes(bytes(data))
    return change


def _huge_length(data):
    data[:8] = struct.pack("<Q", 2**62)


def _bad_offsets(data):
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + length])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"] = [0, 10**12]
    text = json.dumps(header).encode()
    data[:] = struct.pack("<Q", len(text)) + text + data[8 + length:]


def _truncate(data):
    del data[40:]


def _deep(path):
    (path / "config.json").write_text("[" * 100_000 + "]" * 100_000)


def _link(name, target):
    def change(path):
        (path / name).unlink()
        os.symlink(target, path / name)
    return change


CRAFTED = {
    # name: (how the tiny model's directory is changed, what the error must name)
    "model_channels=22400": (lambda p: _config_change(p, _set("unet", "model_channels", 22400)),
                             "unet.model_channels"),
    "model_channels=4096 (bounds ok, too many parameters)":
        (lambda p: _config_change(p, _set("unet", "model_channels", 4096)), "G parameters"),
    "num_res_blocks=10**6": (lambda p: _config_change(p, _set("unet", "num_res_blocks", 10**6)),
                             "unet.num_res_blocks"),
    "num_embeddings=10**12": (lambda p: _config_change(p, _set("vqgan", "num_embeddings", 10**12)),
                              "vqgan.num_embeddings"),
    "num_heads=0": (lambda p: _config_change(p, _set("unet", "num_heads", 0)), "unet.num_heads"),
    "num_heads=3": (lambda p: _config_change(p, _set("unet", "num_heads", 3)), "unet.num_heads"),
    "image_size=10**9": (lambda p: _config_change(p, _set(None, "image_size", 10**9)),
                         "image_size"),
    "image_size=-64": (lambda p: _config_change(p, _set(None, "image_size", -64)), "image_size"),
    "image_size=16384 (bounds ok, too much activation memory)":
        (lambda p: _config_change(p, _set(None, "image_size", 16384)), "GiB of activations"),
    "model_channels='32'": (lambda p: _config_change(p, _set("unet", "model_channels", "32")),
                            "unet.model_channels"),
    "channel_mult of 10**5 levels": (lambda p: _config_change(
        p, _set("unet", "channel_mult", [1] * 10**5)), "unet.channel_mult"),
    "clip_range_start=NaN": (lambda p: _config_change(
        p, _set("diffusion", "clip_range_start", float("nan"))), "diffusion.clip_range_start"),
    "name of 10**6 characters": (lambda p: _config_change(p, _set(None, "name", "x" * 10**6)),
                                 "name"),
    "100k-deep JSON": (_deep, "nested too deeply"),
    "header length 2**62": (_header_change("unet.safetensors", _huge_length),
                            "header length 4611686018427387904 exceeds"),
    "truncated safetensors": (_header_change("vqgan.safetensors", _truncate), "vqgan.safetensors"),
    "data_offsets past the end": (_header_change("unet.safetensors", _bad_offsets),
                                  "data_offsets"),
    "config.json -> /dev/zero": (_link("config.json", "/dev/zero"),
                                 "symbolic link to /dev/zero (a character device)"),
    "unet.safetensors -> /dev/zero": (_link("unet.safetensors", "/dev/zero"),
                                      "a character device"),
    "dangling vqgan.safetensors": (_link("vqgan.safetensors", "nowhere.safetensors"),
                                   "broken symbolic link to nowhere.safetensors"),
}

_LOADER = textwrap.dedent("""
    import json, resource, sys, time
    resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
    from bsldm_fast.modeldir import load
    results = {{}}
    for name, path in json.loads(sys.argv[1]).items():
        start = time.process_time()
        try:
            load(path)
            outcome = ("loaded", "")
        except BaseException as error:  # the test reports whatever escaped
            outcome = (type(error).__name__, str(error)[:2000])
        results[name] = outcome + (time.process_time() - start,)
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def crafted_results(tmp_path_factory):
    """Every crafted directory loaded in one subprocess under MEMORY_LIMIT."""
    root = tmp_path_factory.mktemp("crafted")
    model = random_model("tiny", seed=1)
    dirs = {}
    for i, (name, (craft, _)) in enumerate(CRAFTED.items()):
        path = root / f"m{i}"
        save(path, model.config, model.vqgan, model.unet)
        craft(path)
        dirs[name] = str(path)
    script = _LOADER.format(limit=MEMORY_LIMIT)
    done = subprocess.run([sys.executable, "-c", script, json.dumps(dirs)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_a_crafted_model_directory_fails_fast_with_the_field_named(crafted_results, name):
    kind, message, cpu_s = crafted_results[name]
    assert kind == "ModelDirError", (kind, message)
    assert CRAFTED[name][1] in message
    assert cpu_s < 1.0, f"{name}: {cpu_s:.2f} s of CPU before failing"


def test_a_crafted_model_exits_2_from_the_cli(tmp_path, capsys):
    from bsldm_fast.cli import main

    model = random_model("tiny")
    save(tmp_path / "m", model.config, model.vqgan, model.unet)
    _config_change(tmp_path / "m", _set("unet", "num_heads", 0))
    write = __import__("bsldm_fast.io", fromlist=["write_image"]).write_image
    write(tmp_path / "in" / "a.png", np.zeros((64, 64), np.uint8))
    code = main(["suppress", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
                 "--model", str(tmp_path / "m")])
    assert code == 2 and "unet.num_heads" in capsys.readouterr().err


@pytest.mark.parametrize("config", [
    preset("tiny"), preset("small"),
    preset("tiny").replace(unet=dataclasses.replace(preset("tiny").unet, resblock_updown=False,
                                                    use_scale_shift_norm=False,
                                                    num_head_channels=16,
                                                    attention_resolutions=(1, 2))),
    preset("tiny").replace(vqgan=dataclasses.replace(preset("tiny").vqgan, num_res_layers=0)),
], ids=["tiny", "small", "plain-updown-head-channels", "no-residual-units"])
def test_shapes_and_parameters_from_the_config_match_the_built_networks(config):
    vqgan, unet = build(config)
    shapes = state_shapes(config)
    assert shapes["vqgan"] == {k: tuple(v.shape) for k, v in vqgan.state_dict().items()}
    assert shapes["unet"] == {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    built = sum(v.numel() for m in (vqgan, unet) for v in m.state_dict().values())
    assert parameter_count(config) == built


def test_the_paper_model_is_well_inside_the_limits():
    paper = preset("paper")
    assert 4e8 < parameter_count(paper) < MAX_PARAMETERS / 4
    assert activation_bytes(paper) < MAX_ACTIVATION_BYTES / 8


def test_field_types_are_checked():
    base = json.loads(preset("tiny").to_json())
    for section, key, value in (("unet", "use_scale_shift_norm", "yes"),
                                ("unet", "num_res_blocks", True),
                                ("vqgan", "channels", 16),
                                ("diffusion", "beta_end", "0.02")):
        data = json.loads(json.dumps(base))
        data[section][key] = value
        with pytest.raises(ValueError, match=f"{section}.{key}"):
            ModelConfig.from_dict(data)
    with pytest.raises(ValueError, match="version"):
        ModelConfig.from_dict({**base, "version": "1"})
    UNetConfig()  # the defaults stay valid


# --- fuzz: the loader ends in ModelDirError or a valid model, within bounded memory ----------------




# BSLDM_FUZZ_EXAMPLES=5000 (scripts/fuzz.sh) for a deeper hunt; 40 keeps the suite fast.
LOADER_FUZZ = settings(max_examples=int(os.environ.get("BSLDM_FUZZ_EXAMPLES", 40)),
                       deadline=None, database=None, suppress_health_check=list(HealthCheck))


@contextlib.contextmanager
def memory_cap(extra_bytes: int):
    """Cap this process's address space at its current size plus `extra_bytes` (restored after):
    a loader that allocates for a crafted size fails with MemoryError instead of taking CI down."""
    with open("/proc/self/status") as status:
        size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (size + extra_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-model")
    model = random_model("tiny", seed=4)
    save(path, model.config, model.vqgan, model.unet)
    return path


def _leaves(data, prefix=()):
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _leaves(value, prefix + (key,))
        else:
            yield prefix + (key,)


_ANY_VALUE = st.one_of(
    st.integers(-3, 3), st.integers(-(2**70), 2**70), st.sampled_from([0, 1, 2, 4, 8, 32, 64, 4096]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.booleans(), st.none(),
    st.lists(st.integers(-2, 5000), max_size=6), st.dictionaries(st.text(max_size=4),
                                                                 st.integers(), max_size=2))


def _load_in(folder: Path, base: Path, changed: dict[str, bytes]):
    for name in ("config.json", "vqgan.safetensors", "unet.safetensors"):
        if name in changed:
            (folder / name).write_bytes(changed[name])
        else:
            os.symlink(base / name, folder / name)  # a link to a regular file is fine to load
    try:
        model = load(folder)
    except ModelDirError:
        return None
    assert isinstance(model, Model)
    return model


@LOADER_FUZZ
@given(data=st.data())
def test_fuzz_mutated_config(tiny_dir, data):
    config = json.loads((tiny_dir / "config.json").read_text())
    leaves = sorted(_leaves(config))
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(leaves))
        section = config
        for key in where[:-1]:
            section = section[key] if isinstance(section.get(key), dict) else {}
        action = data.draw(st.sampled_from(["set", "set", "set", "delete", "add"]))
        if action == "set":
            section[where[-1]] = data.draw(_ANY_VALUE)
        elif action == "delete":
            section.pop(where[-1], None)
        else:
            section[data.draw(st.text(max_size=8))] = data.draw(_ANY_VALUE)
    text = json.dumps(config) if data.draw(st.booleans()) else json.dumps(config)[
        : data.draw(st.integers(0, 2000))]
    with tempfile.TemporaryDirectory() as folder, memory_cap(3 * 1024**3):
        _load_in(Path(folder), tiny_dir, {"config.json": text.encode()})


@LOADER_FUZZ
@given(data=st.data(), name=st.sampled_from(["vqgan.safetensors", "unet.safetensors"]))
def test_fuzz_mutated_safetensors_header(tiny_dir, data, name):
    blob = bytearray((tiny_dir / name).read_bytes())
    length = struct.unpack("<Q", blob[:8])[0]
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["length", "header byte", "digit"]))
        if kind == "length":
            blob[:8] = struct.pack("<Q", data.draw(st.sampled_from(
                [0, 1, length - 1, length + 1, len(blob), 2**62, 2**64 - 1])))
        elif kind == "header byte":
            blob[data.draw(st.integers(0, 8 + length - 1))] = data.draw(st.integers(0, 255))
        else:  # shapes and offsets are where a crafted header hurts
            digits = [i for i in range(8, 8 + length) if chr(blob[i]).isdigit()]
            blob[data.draw(st.sampled_from(digits))] = ord(data.draw(st.sampled_from("0123456789")))
    if data.draw(st.booleans()):
        del blob[data.draw(st.integers(0, len(blob) - 1)):]
    with tempfile.TemporaryDirectory() as folder, memory_cap(3 * 1024**3):
        _load_in(Path(folder), tiny_dir, {name: bytes(blob)})


def test_the_fuzz_base_loads(tiny_dir, tmp_path):
    model = _load_in(tmp_path, tiny_dir, {})
    assert model is not None and model.config == preset("tiny")
    shutil.rmtree(tmp_path)
