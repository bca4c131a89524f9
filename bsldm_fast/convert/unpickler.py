"""Read `torch.save` files without importing or running anything they name.

A `torch.save` file is a zip archive holding a pickle (`data.pkl`) and raw tensor storages
(`data/<key>`). Unpickling with the standard library calls whatever callable the pickle names, so
a checkpoint can run any code. This reader unpickles with an allow-list (Python's documented
"restricting globals" pattern, https://docs.python.org/3/library/pickle.html#restricting-globals):

- the classes of the two BS-LDM networks and their torch.nn parts become inert `PickledObject`
  records (class name + pickled `__dict__`); their code is never imported;
- tensors are rebuilt by our own functions from bytes read here, after checking every size and
  stride against the storage;
- `OrderedDict`, `set`, `frozenset`, `Counter` and torch dtypes are the only other names allowed.

Anything else (`os.system`, `builtins.eval`, an unknown class, ...) stops the load with
`UnsafeCheckpointError` naming it, before it could be called. No `torch.load` is involved.
"""

from __future__ import annotations

import collections
import io
import pickle
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


class UnsafeCheckpointError(ValueError):
    """A checkpoint names a callable outside the allow-list, or its contents are malformed."""


class PickledObject:
    """An inert record of a pickled instance: its class's qualified name, and its pickled state.

    One subclass per allowed class name (see `_stub`), so the unpickler can instantiate it; no
    method of the original class exists here, so nothing the pickle asks for can run.
    """

    qualname = "?"

    def __new__(cls, *args: Any) -> "PickledObject":
        obj = super().__new__(cls)
        obj.args = args
        obj.state = None
        return obj

    def __init__(self, *args: Any) -> None:
        """Reached only from a REDUCE on the class; the arguments are kept by __new__, unused."""

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<pickled {self.qualname}>"


class _Record:
    """Base of the tensor-side records; a pickle may not BUILD (set attributes) on them."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise UnsafeCheckpointError(f"the pickle tries to set state on a {type(self).__name__}")


class StorageKind(_Record):
    """What `torch.FloatStorage` & co. resolve to: just the element dtype."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: torch.dtype):
        self.name = name
        self.dtype = dtype


class StorageRecord(_Record):
    """A flat CPU tensor over one storage's bytes."""

    __slots__ = ("flat",)

    def __init__(self, flat: torch.Tensor):
        self.flat = flat


class TensorRecord(_Record):
    """A tensor rebuilt from a storage; `tensor` is a view, copied when the weights are taken."""

    __slots__ = ("tensor", "requires_grad")

    def __init__(self, tensor: torch.Tensor, requires_grad: bool):
        self.tensor = tensor
        self.requires_grad = requires_grad


class ParameterRecord(TensorRecord):
    """An `nn.Parameter` (a tensor with `requires_grad` meaning trainable)."""

    __slots__ = ()


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,
}

_DTYPES = {
    name: getattr(torch, name)
    for name in ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8",
                 "uint8", "bool", "float", "double", "half", "long", "int")
}

_TORCH_NN = {
    "torch.nn.modules.container": ("Sequential", "ModuleList", "ModuleDict"),
    "torch.nn.modules.conv": ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
                              "ConvTranspose3d"),
    "torch.nn.modules.linear": ("Linear", "Identity"),
    "torch.nn.modules.activation": ("SiLU", "ReLU", "LeakyReLU", "PReLU", "GELU", "Tanh", "Sigmoid"),
    "torch.nn.modules.dropout": ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d"),
    "torch.nn.modules.normalization": ("GroupNorm", "LayerNorm"),
    "torch.nn.modules.batchnorm": ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d"),
    "torch.nn.modules.instancenorm": ("InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"),
    "torch.nn.modules.pooling": ("AvgPool1d", "AvgPool2d", "AvgPool3d"),
    "torch.nn.modules.sparse": ("Embedding",),
}

# guided-diffusion's U-Net as BS-LDM vendored it (`modules/`) and as guided-diffusion ships it.
_GUIDED_DIFFUSION_UNET = ("UNetModel", "TimestepEmbedSequential", "ResBlock", "AttentionBlock",
                          "QKVAttentionLegacy", "QKVAttention", "Upsample", "Downsample")
_GUIDED_DIFFUSION_NN = ("GroupNorm32", "SiLU")

# monai-generative's VQVAE and the monai blocks it is made of.
_MONAI_GENERATIVE = {
    "generative.networks.nets.vqvae": ("VQVAE", "Encoder", "Decoder", "VQVAEResidualUnit"),
    "generative.networks.layers.vector_quantizer": ("VectorQuantizer", "EMAQuantizer"),
    "monai.networks.blocks.convolutions": ("Convolution", "ResidualUnit"),
    "monai.networks.blocks.acti_norm": ("ADN",),
}


def _allowed_classes() -> frozenset[str]:
    names: list[str] = []
    for module, classes in (*_TORCH_NN.items(), *_MONAI_GENERATIVE.items()):
        names += [f"{module}.{c}" for c in classes]
    for package in ("modules", "guided_diffusion"):
        names += [f"{package}.unet.{c}" for c in _GUIDED_DIFFUSION_UNET]
        names += [f"{package}.nn.{c}" for c in _GUIDED_DIFFUSION_NN]
    return frozenset(names)


ALLOWED_CLASSES = _allowed_classes()
"""Qualified class names that become `PickledObject` records."""

_stubs: dict[str, type[PickledObject]] = {}


def _stub(qualname: str) -> type[PickledObject]:
    if qualname not in _stubs:
        _stubs[qualname] = type(qualname.rsplit(".", 1)[1], (PickledObject,), {"qualname": qualname})
    return _stubs[qualname]


def _check_hooks(hooks: Any, what: str) -> None:
    # NOTE: torch pickles an (expected empty) hook dict with each tensor; a non-empty one would
    # carry callables, so it is refused rather than dropped silently.
    if not isinstance(hooks, dict) or hooks:
        raise UnsafeCheckpointError(f"{what} carries backward hooks ({type(hooks).__name__})")


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise UnsafeCheckpointError(f"malformed tensor {what}: {value!r}")
    return tuple(value)


def rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any,
                   backward_hooks: Any, metadata: Any = None) -> TensorRecord:
    """Our `torch._utils._rebuild_tensor_v2`: a strided view of a storage, bounds checked."""
    if not isinstance(storage, StorageRecord):
        raise UnsafeCheckpointError(f"tensor rebuilt from a {type(storage).__name__}, not a storage")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise UnsafeCheckpointError(f"malformed tensor offset: {offset!r}")
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(size) != len(stride):
        raise UnsafeCheckpointError(f"tensor size {size} and stride {stride} differ in length")
    if not isinstance(requires_grad, bool):
        raise UnsafeCheckpointError(f"malformed requires_grad: {requires_grad!r}")
    _check_hooks(backward_hooks, "a tensor")
    if metadata:
        raise UnsafeCheckpointError("tensor metadata (conjugate/negative bits) is not supported")
    if all(size):
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.flat.numel():
            raise UnsafeCheckpointError(
                f"tensor of size {size} reaches element {last} of a storage of "
                f"{storage.flat.numel()}"
            )
    return TensorRecord(storage.flat.as_strided(size, stride, offset), requires_grad)


def rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> ParameterRecord:
    """Our `torch._utils._rebuild_parameter`."""
    if not isinstance(data, TensorRecord) or not isinstance(requires_grad, bool):
        raise UnsafeCheckpointError("malformed nn.Parameter")
    _check_hooks(backward_hooks, "a parameter")
    return ParameterRecord(data.tensor, requires_grad)


def rebuild_parameter_with_state(data: Any, requires_grad: Any, backward_hooks: Any,
                                 state: Any) -> ParameterRecord:
    """Our `torch._utils._rebuild_parameter_with_state`; extra Python attributes are refused."""
    if state not in (None, {}, (None, None), ({}, None), (None, {}), ({}, {})):
        raise UnsafeCheckpointError("an nn.Parameter carries extra Python attributes")
    return rebuild_parameter(data, requires_grad, backward_hooks)


_FUNCTIONS: dict[str, Any] = {
    "collections.OrderedDict": collections.OrderedDict,
    "collections.Counter": collections.Counter,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "torch._utils._rebuild_tensor_v2": rebuild_tensor,
    "torch._utils._rebuild_parameter": rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": rebuild_parameter_with_state,
}


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only allow-listed names and reads storages from `read_storage`."""

    def __init__(self, file: io.BufferedIOBase, read_storage: Callable[[str], bytes], source: str):
        super().__init__(file)
        self._read_storage = read_storage
        self._source = source
        self._storages: dict[str, StorageRecord] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__builtin__":  # protocol-2 pickles spell builtins the Python 2 way
            module = "builtins"
        qualname = f"{module}.{name}"
        if qualname in _FUNCTIONS:
            return _FUNCTIONS[qualname]
        if module == "torch" and name in _STORAGE_DTYPES:
            return StorageKind(name, _STORAGE_DTYPES[name])
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        if qualname in ALLOWED_CLASSES:
            return _stub(qualname)
        raise UnsafeCheckpointError(
            f"{self._source}: refusing to load: the pickle names `{qualname}`, which is neither part "
            "of the BS-LDM networks nor a tensor. Nothing was imported or run. If this file comes "
            "from a source you trust, re-save its state_dict() as safetensors and convert that."
        )

    def persistent_load(self, pid: Any) -> StorageRecord:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise UnsafeCheckpointError(f"{self._source}: unknown persistent record {pid!r:.80}")
        kind, key, _location, numel = pid[1:]
        if not isinstance(kind, StorageKind) or not isinstance(key, str) or not isinstance(numel, int):
            raise UnsafeCheckpointError(f"{self._source}: malformed storage record {pid!r:.80}")
        if key in self._storages:
            return self._storages[key]
        data = self._read_storage(key)
        itemsize = torch.empty((), dtype=kind.dtype).element_size()
        if kind.name != "UntypedStorage" and len(data) != numel * itemsize:
            raise UnsafeCheckpointError(
                f"{self._source}: storage {key} holds {len(data)} bytes, expected {numel} x {itemsize}"
            )
        if len(data) % itemsize:
            raise UnsafeCheckpointError(f"{self._source}: storage {key} is not whole {kind.dtype} elements")
        flat = (torch.frombuffer(bytearray(data), dtype=kind.dtype) if data
                else torch.empty(0, dtype=kind.dtype))
        record = StorageRecord(flat)
        self._storages[key] = record
        return record


def _zip_pickle(path: Path) -> Any:
    """Unpickle the data.pkl of a torch zip archive with `SafeUnpickler`."""
    source = str(path)
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        pickles = sorted(n for n in names if n == "data.pkl" or n.endswith("/data.pkl"))
        # torch writes `<archive name>/data.pkl`; exactly one top-level record is expected.
        pickles = [n for n in pickles if n.count("/") <= 1]
        if len(pickles) != 1:
            raise UnsafeCheckpointError(f"{source}: not a torch.save archive (no single data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        if prefix + "constants.pkl" in names:
            raise UnsafeCheckpointError(
                f"{source} is a TorchScript archive (torch.jit.save); TorchScript programs are not "
                "loaded. Save the model's state_dict() instead."
            )
        byteorder = prefix + "byteorder"
        if byteorder in names and archive.read(byteorder).decode().strip() != sys.byteorder:
            raise UnsafeCheckpointError(f"{source} was saved on a machine with another byte order")

        def read_storage(key: str) -> bytes:
            record = f"{prefix}data/{key}"
            if record not in names:
                raise UnsafeCheckpointError(f"{source}: storage record {record} is missing")
            return archive.read(record)

        unpickler = SafeUnpickler(io.BytesIO(archive.read(pickles[0])), read_storage, source)
        try:
            return unpickler.load()
        except UnsafeCheckpointError:
            raise
        except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError,
                IndexError, KeyError, RuntimeError) as error:
            raise UnsafeCheckpointError(f"{source}: malformed checkpoint: {error}") from error


def load(path: str | Path) -> Any:
    """The object a `torch.save` (zip format) or safetensors file holds, read without running code.

    Tensors come back as `TensorRecord` / `ParameterRecord` and pickled modules as
    `PickledObject` records; `bsldm_fast.convert.checkpoint` turns them into state dicts.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    with path.open("rb") as f:
        head = f.read(9)
    if zipfile.is_zipfile(path):
        return _zip_pickle(path)
    # safetensors: an 8-byte little-endian header length, then the JSON header.
    if head[8:9] == b"{":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise UnsafeCheckpointError(f"{path}: not a readable safetensors file: {error}") from error
        return {k: TensorRecord(v, False) for k, v in tensors.items()}
    raise UnsafeCheckpointError(
        f"{path} is neither a zip-format torch.save file nor safetensors. Files written by "
        "PyTorch < 1.6 (the legacy format) are not read: re-save them with a current PyTorch."
    )
