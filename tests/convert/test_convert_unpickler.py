"""The restricted unpickler refuses malicious checkpoints before anything in them runs.

Each payload would create a marker file if it ran; the control test shows that the standard
unpickler (torch.load with weights_only=False) does run it, so the marker is a real witness.
"""

from __future__ import annotations

import collections
import os
import pickle
import subprocess
import sys
import zipfile

import pytest
import torch

from bsldm_fast.convert import UnsafeCheckpointError, load, read_weights
from bsldm_fast.convert.unpickler import StorageRecord, rebuild_tensor


class SystemPayload:
    """Unpickling calls os.system(command)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class ExecPayload:
    """Unpickling calls builtins.exec(code)."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


def _touch(marker) -> str:
    return f"touch {marker}"


def _checkpoint(payload) -> dict:
    """A plausible checkpoint dict with real tensors and the payload hidden inside."""
    return {"state_dict": {"weight": torch.randn(3, 3)}, "epoch": 7, "extra": [1, payload]}


def test_control_the_payload_runs_under_plain_torch_load(tmp_path):
    marker = tmp_path / "ran"
    torch.save(_checkpoint(SystemPayload(_touch(marker))), tmp_path / "evil.pth")
    code = f"import torch; torch.load({str(tmp_path / 'evil.pth')!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    assert marker.exists()


def test_os_system_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    torch.save(_checkpoint(SystemPayload(_touch(marker))), tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError, match=r"`posix\.system`|`os\.system`|`nt\.system`"):
        read_weights(tmp_path / "evil.pth")
    assert not marker.exists()


def test_exec_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    torch.save(_checkpoint(ExecPayload(f"open({str(marker)!r}, 'w').close()")), tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"`builtins\.exec`"):
        load(tmp_path / "evil.pt")
    assert not marker.exists()


def test_payload_inside_a_pickled_module_is_refused(tmp_path):
    """Hidden in the __dict__ of an otherwise allowed torch.nn module."""
    marker = tmp_path / "ran"
    layer = torch.nn.Linear(2, 2)
    layer.note = SystemPayload(_touch(marker))
    torch.save(layer, tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError, match="system"):
        read_weights(tmp_path / "evil.pth")
    assert not marker.exists()


def _zip_with_pickle(path, data: bytes) -> None:
    """A torch-style archive whose data.pkl is `data` (hand-written pickles)."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", data)
        z.writestr("archive/byteorder", sys.byteorder)


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_every_pickle_protocol_goes_through_the_allow_list(tmp_path, protocol):
    """GLOBAL (protocols 0-3) and STACK_GLOBAL (4+) both resolve names through find_class."""
    marker = tmp_path / "ran"
    data = pickle.dumps({"x": SystemPayload(_touch(marker))}, protocol=protocol)
    _zip_with_pickle(tmp_path / "evil.pth", data)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load(tmp_path / "evil.pth")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["builtins.getattr", "subprocess.Popen", "modules.unet.system",
                                  "torch.load", "torch._utils._rebuild_from_type_v2", "builtins.eval",
                                  "copyreg._reconstructor", "guided_diffusion.unet.th"])
def test_names_outside_the_allow_list_are_refused(tmp_path, name):
    module, attr = name.rsplit(".", 1)
    data = b"\x80\x02c" + f"{module}\n{attr}\n".encode() + b")R."  # GLOBAL; call it with (); STOP
    _zip_with_pickle(tmp_path / "evil.pth", data)
    with pytest.raises(UnsafeCheckpointError, match=f"`{name}`".replace(".", r"\.")):
        load(tmp_path / "evil.pth")


def test_python2_builtins_spelling_is_normalised_then_refused(tmp_path):
    _zip_with_pickle(tmp_path / "evil.pth", b"\x80\x02c__builtin__\neval\n)R.")
    with pytest.raises(UnsafeCheckpointError, match=r"`builtins\.eval`"):
        load(tmp_path / "evil.pth")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_archives_are_refused(tmp_path):
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "scripted.pt")
    with pytest.raises(UnsafeCheckpointError, match="TorchScript"):
        load(tmp_path / "scripted.pt")


def test_legacy_format_is_refused_with_a_clear_error(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError, match="legacy"):
        load(tmp_path / "old.pth")


def test_tensor_views_beyond_their_storage_are_refused(gen):
    storage = StorageRecord(torch.randn(10, generator=gen))
    hooks = collections.OrderedDict()
    view = rebuild_tensor(storage, 2, (2, 4), (4, 1), False, hooks)
    assert torch.equal(view.tensor, storage.flat[2:10].view(2, 4))
    with pytest.raises(UnsafeCheckpointError, match="reaches element"):
        rebuild_tensor(storage, 3, (2, 4), (4, 1), False, hooks)
    with pytest.raises(UnsafeCheckpointError, match="malformed"):
        rebuild_tensor(storage, -1, (2,), (1,), False, hooks)
    with pytest.raises(UnsafeCheckpointError, match="hooks"):
        rebuild_tensor(storage, 0, (2,), (1,), False, collections.OrderedDict(h=print))


def test_plain_tensors_and_containers_load_exactly(tmp_path, gen):
    """What the allow-list lets through: nested dicts, lists, sets, dtypes, tensors (any dtype,
    shared storages and strided views), parameters."""
    base = torch.randn(6, 5, generator=gen)
    obj = {
        "state_dict": collections.OrderedDict(a=base, b=base[:, 1], c=torch.arange(4), d=torch.ones(2).half()),
        "param": torch.nn.Parameter(torch.randn(3, generator=gen)),
        "meta": {"epoch": 3, "names": {"x", "y"}, "dtype": torch.float32, "empty": torch.empty(0, 2)},
    }
    torch.save(obj, tmp_path / "ckpt.pt")
    loaded = load(tmp_path / "ckpt.pt")
    sd = loaded["state_dict"]
    for key in ("a", "b", "c", "d"):
        assert torch.equal(sd[key].tensor, obj["state_dict"][key])
        assert sd[key].tensor.dtype == obj["state_dict"][key].dtype
    assert torch.equal(loaded["param"].tensor, obj["param"]) and loaded["param"].requires_grad
    assert loaded["meta"]["names"] == {"x", "y"} and loaded["meta"]["dtype"] is torch.float32
    assert loaded["meta"]["empty"].tensor.shape == (0, 2)
