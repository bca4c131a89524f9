"""The engine cache in a model directory: `onnx/` and `engines/`, each file with a JSON manifest.

An engine is valid only for the exact weights, TensorRT version, GPU, precision and batch profile it
was built for, so all of these form its key; the key's digest is in the file name, and the manifest
beside it holds the fields, so a stale engine can say what changed. Engines for other GPUs live side
by side (a model directory on a shared disk serves several machines). Only files this package wrote
(those with a manifest) are ever replaced or pruned.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .._files import atomic_write
from ..modeldir import CONFIG_FILE, UNET_FILE, VQGAN_FILE

logger = logging.getLogger(__name__)

ONNX_DIR = "onnx"
ENGINE_DIR = "engines"
ENGINE_PRECISIONS = ("fp16", "bf16", "fp8", "int8")
CACHE_FORMAT = 1


class EngineError(RuntimeError):
    """An engine or ONNX graph is missing, stale or cannot be built; the message says what to run."""


def build_command(model_dir: str | Path, precision: str, profile: str = "1-1-16") -> str:
    """The command that builds an engine; batch flags only where the profile is not the default."""
    command = f"bsldm-fast build-engine {model_dir} --precision {precision}"
    batches = profile.split("@")[0].split("-")
    if batches != ["1", "1", "16"]:
        command += " --min-batch {} --opt-batch {} --max-batch {}".format(*batches)
    return command


_hash_memo: dict[tuple[str, tuple[tuple[int, int], ...]], str] = {}


def cpu_identity() -> tuple[str, str]:
    """(CPU model name, digest of its instruction-set flags): what a compiled CPU engine or a CPU timing is specific to."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    flags = " ".join(sorted((fields.get("flags") or fields.get("Features") or "").split()))
    return name, hashlib.sha256(flags.encode()).hexdigest()[:16]


def model_hash(model_dir: str | Path) -> str:
    """SHA-256 of the model's config and weights (memoised per file size and modification time)."""
    path = Path(model_dir)
    files = [path / name for name in (CONFIG_FILE, VQGAN_FILE, UNET_FILE)]
    stamp = tuple((f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    memo_key = (str(path.resolve()), stamp)
    if memo_key not in _hash_memo:
        digest = hashlib.sha256()
        for f in files:
            digest.update(f.name.encode() + b"\0")
            with open(f, "rb") as stream:
                while chunk := stream.read(1 << 24):
                    digest.update(chunk)
        _hash_memo[memo_key] = digest.hexdigest()
    return _hash_memo[memo_key]


@dataclass(frozen=True)
class OnnxKey:
    """What an exported ONNX graph depends on."""

    graph: str
    precision: str
    model_hash: str
    opset: int
    exporter: str
    """torch version and bsldm_fast version that wrote it."""


@dataclass(frozen=True)
class EngineKey:
    """What a serialised TensorRT engine depends on; any change makes it stale."""

    graph: str
    precision: str
    model_hash: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    profile: str
    """'min-opt-max' batch at the model's fixed resolution, e.g. '1-1-16@128x128'."""
    onnx_opset: int

    def digest(self) -> str:
        return key_digest(self)

    def file_name(self) -> str:
        return f"{self.graph}-{self.precision}-{self.digest()}.plan"

    def same_target(self, other: "EngineKey") -> bool:
        """Same graph, precision and GPU: `other` is this engine built for an older state."""
        return (self.graph, self.precision, self.gpu_name, self.compute_capability) == (
            other.graph, other.precision, other.gpu_name, other.compute_capability)


def key_digest(key) -> str:
    """16 hex digits of a cache key (a dataclass): part of its file's name, so a new state gets a new file."""
    text = json.dumps(dataclasses.asdict(key), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def manifest_path(file: Path) -> Path:
    return file.with_name(file.name + ".json")


def write_manifest(file: Path, key: OnnxKey | EngineKey) -> None:
    data = {"format": CACHE_FORMAT, "kind": type(key).__name__, **dataclasses.asdict(key)}
    atomic_write(manifest_path(file), lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))


def read_manifest(file: Path, cls: type) -> OnnxKey | EngineKey | None:
    """The key recorded beside `file`, or None when there is no readable manifest of kind `cls`."""
    try:
        data = json.loads(manifest_path(file).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("kind") != cls.__name__:
        return None
    fields = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in data.items() if k in fields})
    except TypeError:
        return None


def differences(old: EngineKey | OnnxKey, new: EngineKey | OnnxKey) -> list[str]:
    """Readable list of the fields that changed, e.g. ["tensorrt_version 10.3.0 -> 10.8.0"]."""
    out = []
    for f in dataclasses.fields(new):
        a, b = getattr(old, f.name), getattr(new, f.name)
        if a != b:
            if f.name == "model_hash":
                out.append("the model's weights or config changed")
            else:
                out.append(f"{f.name} {a} -> {b}")
    return out


def engine_dir(model_dir: str | Path) -> Path:
    return Path(model_dir) / ENGINE_DIR


def _engines(model_dir: str | Path) -> list[tuple[Path, EngineKey]]:
    found = []
    directory = engine_dir(model_dir)
    if directory.is_dir():
        for file in sorted(directory.glob("*.plan")):
            key = read_manifest(file, EngineKey)
            if isinstance(key, EngineKey):
                found.append((file, key))
    return found


def find_engine(model_dir: str | Path, key: EngineKey) -> Path:
    """The cached engine for `key`, or EngineError naming what is missing or changed and the fix."""
    file = engine_dir(model_dir) / key.file_name()
    if file.is_file() and read_manifest(file, EngineKey) == key:
        return file
    command = build_command(model_dir, key.precision, key.profile)
    stale = [old for _, old in _engines(model_dir) if old.same_target(key)]
    if stale:
        reasons = "; ".join(differences(stale[-1], key))
        raise EngineError(
            f"the {key.precision} TensorRT engine for the {key.graph} of {model_dir} is stale "
            f"({reasons}); rebuild it with: {command}"
        )
    raise EngineError(
        f"no {key.precision} TensorRT engine for the {key.graph} of {model_dir} on this GPU "
        f"({key.gpu_name}, {key.compute_capability}, TensorRT {key.tensorrt_version}); "
        f"build it with: {command}"
    )


def ensure_engine(model_dir: str | Path, key: EngineKey, build: Callable[[], bytes],
                  force: bool = False) -> tuple[Path, bool]:
    """(path, built): the cached engine for `key`, built by `build()` when missing, stale or forced.

    The new engine is written atomically, its manifest after it (a plan without a manifest is never
    used); engines this package built for the same graph, precision and GPU under an older key are
    then removed.
    """
    if not force:
        try:
            return find_engine(model_dir, key), False
        except EngineError:
            pass
    directory = engine_dir(model_dir)
    directory.mkdir(parents=True, exist_ok=True)
    file = directory / key.file_name()
    plan = build()
    manifest_path(file).unlink(missing_ok=True)
    atomic_write(file, lambda tmp: Path(tmp).write_bytes(plan))
    write_manifest(file, key)
    for old_file, old_key in _engines(model_dir):
        if old_file != file and old_key.same_target(key):
            logger.info("removing stale engine %s (%s)", old_file.name,
                        "; ".join(differences(old_key, key)))
            old_file.unlink(missing_ok=True)
            manifest_path(old_file).unlink(missing_ok=True)
    return file, True
