"""The DICOM node's settings: frozen dataclasses, read from a TOML file and overridden by flags.

Every field is typed and checked when the file is read; an unknown key is an error (a typo in a
config must not silently fall back to a default), and so is a value of the wrong type.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_VERSION = 1

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # AE: 16 chars, no backslash/controls


class NodeConfigError(ValueError):
    """A node config file or flag that cannot be used; the message names the field."""


@dataclass(frozen=True)
class Destination:
    """A C-STORE SCP that receives every derived instance (a PACS such as Orthanc)."""

    ae_title: str
    """The destination's (called) AE title."""
    host: str
    port: int
    tls: bool = False
    """Connect with TLS (the node's [tls] section gives the CA and, optionally, a client cert)."""

    @property
    def key(self) -> str:
        """'AE@host:port': how the spool names this destination."""
        return f"{self.ae_title}@{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> "Destination":
        """'AE@host:port' (the --dest flag)."""
        match = re.fullmatch(r"([^@]+)@(.+):(\d+)", text.strip())
        if not match:
            raise NodeConfigError(f"destination {text!r}: expected AE@host:port")
        return cls(match[1], match[2], int(match[3]))


@dataclass(frozen=True)
class ModelSettings:
    """What runs the images: the same meaning as `bsldm-fast suppress`'s flags."""

    path: str = "demo"
    """A model directory, 'demo' (the bundled 512-px model) or 'random:<config>'."""
    device: str = "auto"
    precision: str = "fp32"
    sampler: str = "ddpm"
    steps: int | None = None
    """Denoising steps; None: the sampler's default."""
    seed: int = 0
    backend: str = "auto"
    threads: int = 0
    """torch CPU threads; 0 leaves torch's default."""


@dataclass(frozen=True)
class FilterSettings:
    """Which received instances are processed; everything else is acknowledged and left alone."""

    modalities: tuple[str, ...] = ("CR", "DX")
    body_parts: tuple[str, ...] = ()
    """Body Part Examined values accepted (e.g. ['CHEST']); empty: any."""
    view_positions: tuple[str, ...] = ()
    """View Position values accepted (e.g. ['PA', 'AP']); empty: any."""


@dataclass(frozen=True)
class AccessSettings:
    """Who may associate. Empty lists: anyone (the node then should listen on loopback only)."""

    allowed_aets: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    """Peer IP addresses allowed to connect (exact match); empty: any."""


@dataclass(frozen=True)
class Limits:
    """Disk, retry and give-up limits."""

    max_disk_percent: float = 90.0
    """Above this use of the spool's file system, C-STOREs get 0xA700 (out of resources)."""
    retry_initial_s: float = 2.0
    retry_max_s: float = 60.0
    """Sending retries back off from retry_initial_s, doubling, up to retry_max_s."""
    give_up_after_s: float = 3600.0
    """An item not delivered everywhere this long after it was processed moves to failed/."""
    max_pdu: int = 0
    """Maximum PDU size the SCP accepts (0: unlimited)."""


@dataclass(frozen=True)
class TLSSettings:
    """TLS for the SCP (cert + key) and for sending (ca, and optionally cert + key)."""

    cert: str = ""
    key: str = ""
    ca: str = ""
    """CA bundle that peers' certificates are checked against."""
    require_client_cert: bool = False


@dataclass(frozen=True)
class NodeConfig:
    """Everything `bsldm-fast serve` needs; `load_config` reads it from TOML."""

    version: int = CONFIG_VERSION
    ae_title: str = "BSLDM_FAST"
    host: str = "127.0.0.1"
    port: int = 11112
    spool: str = "bsldm_node_spool"
    batch_size: int = 4
    max_wait_ms: int = 200
    """The worker runs a batch when batch_size items are waiting, or this long after the first."""
    bone: bool = False
    """Also send the bone image (CXR minus soft tissue) as a second derived series."""
    log_phi: bool = False
    """Log Patient Name / ID beside SOP Instance UIDs (off: logs name SOP Instance UIDs only)."""
    model: ModelSettings = field(default_factory=ModelSettings)
    filter: FilterSettings = field(default_factory=FilterSettings)
    access: AccessSettings = field(default_factory=AccessSettings)
    limits: Limits = field(default_factory=Limits)
    tls: TLSSettings | None = None
    destinations: tuple[Destination, ...] = ()

    def __post_init__(self):
        _check(self)


_SECTIONS = {"model": ModelSettings, "filter": FilterSettings, "access": AccessSettings,
             "limits": Limits, "tls": TLSSettings}


def _typed(cls, values: dict[str, Any], where: str):
    """`cls(**values)` with every key known and every value of its declared type."""
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    out = {}
    for key, value in values.items():
        if key not in hints:
            raise NodeConfigError(f"{where}: unknown key {key!r}; known: {', '.join(hints)}")
        hint = str(hints[key])
        name = f"{where}.{key}" if where else key
        if hint.startswith("tuple[str"):
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise NodeConfigError(f"{name}: expected a list of strings, got {value!r}")
            value = tuple(value)
        elif hint == "bool":
            if not isinstance(value, bool):
                raise NodeConfigError(f"{name}: expected true or false, got {value!r}")
        elif hint.startswith("int"):
            if value is None and "None" in hint:
                pass
            elif not isinstance(value, int) or isinstance(value, bool):
                raise NodeConfigError(f"{name}: expected an integer, got {value!r}")
        elif hint == "float":
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise NodeConfigError(f"{name}: expected a number, got {value!r}")
            value = float(value)
        elif hint == "str":
            if not isinstance(value, str):
                raise NodeConfigError(f"{name}: expected a string, got {value!r}")
        out[key] = value
    return out


def from_dict(data: dict[str, Any]) -> NodeConfig:
    """A NodeConfig from a parsed TOML document (sections as tables, destinations an array)."""
    data = dict(data)
    nested: dict[str, Any] = {}
    for section, cls in _SECTIONS.items():
        if section in data:
            table = data.pop(section)
            if not isinstance(table, dict):
                raise NodeConfigError(f"[{section}] must be a table")
            nested[section] = cls(**_typed(cls, table, section))
    if "destinations" in data:
        items = data.pop("destinations")
        if not isinstance(items, list) or not all(isinstance(d, dict) for d in items):
            raise NodeConfigError("destinations: expected [[destinations]] tables")
        destinations = []
        for i, item in enumerate(items):
            for key in ("ae_title", "host", "port"):
                if key not in item:
                    raise NodeConfigError(f"destinations[{i}]: missing {key!r}")
            destinations.append(Destination(**_typed(Destination, item, f"destinations[{i}]")))
        nested["destinations"] = tuple(destinations)
    top = _typed(NodeConfig, data, "")
    for key in _SECTIONS:
        if key in top:
            raise NodeConfigError(f"{key} must be a [{key}] table")
    return NodeConfig(**top, **nested)


def load_config(path: str | Path) -> NodeConfig:
    """Read a TOML node config; NodeConfigError naming the file and the field."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise NodeConfigError(f"{path}: cannot read it ({error.strerror})") from error
    except tomllib.TOMLDecodeError as error:
        raise NodeConfigError(f"{path}: not valid TOML ({error})") from error
    try:
        return from_dict(data)
    except (NodeConfigError, TypeError) as error:
        raise NodeConfigError(f"{path}: {error}") from error


def replace(config: NodeConfig, **changes) -> NodeConfig:
    """`config` with top-level fields or 'section.field' keys changed (None values are ignored)."""
    top, nested = {}, {}
    for key, value in changes.items():
        if value is None:
            continue
        if "." in key:
            section, name = key.split(".", 1)
            nested.setdefault(section, {})[name] = value
        else:
            top[key] = value
    for section, values in nested.items():
        current = getattr(config, section) or _SECTIONS[section]()
        top[section] = dataclasses.replace(current, **values)
    return dataclasses.replace(config, **top)


def _check(config: NodeConfig) -> None:
    if config.version != CONFIG_VERSION:
        raise NodeConfigError(f"version: this node reads version {CONFIG_VERSION}, got "
                              f"{config.version}")
    titles = [("ae_title", config.ae_title)] + [
        (f"destinations[{i}].ae_title", d.ae_title) for i, d in enumerate(config.destinations)
    ] + [(f"access.allowed_aets[{i}]", a) for i, a in enumerate(config.access.allowed_aets)]
    for name, title in titles:
        if not _AE_TITLE.match(title) or not title.strip():
            raise NodeConfigError(f"{name}: {title!r} is not an AE title (1-16 characters, no "
                                  "backslash or control characters)")
    ports = [("port", config.port)] + [(f"destinations[{i}].port", d.port)
                                       for i, d in enumerate(config.destinations)]
    for name, port in ports:
        if not 0 <= port <= 65535:
            raise NodeConfigError(f"{name}: {port} is not a TCP port")
    if not 1 <= config.batch_size <= 256:
        raise NodeConfigError(f"batch_size: expected 1-256, got {config.batch_size}")
    if not 0 <= config.max_wait_ms <= 600_000:
        raise NodeConfigError(f"max_wait_ms: expected 0-600000, got {config.max_wait_ms}")
    limits = config.limits
    if not 0.0 <= limits.max_disk_percent <= 100.0:
        raise NodeConfigError(f"limits.max_disk_percent: expected 0-100, got "
                              f"{limits.max_disk_percent}")
    if not 0 < limits.retry_initial_s <= limits.retry_max_s:
        raise NodeConfigError("limits: expected 0 < retry_initial_s <= retry_max_s")
    if limits.give_up_after_s <= 0:
        raise NodeConfigError("limits.give_up_after_s: must be positive")
    if not config.spool:
        raise NodeConfigError("spool: a folder is required")
    if config.tls is not None and bool(config.tls.cert) != bool(config.tls.key):
        raise NodeConfigError("tls: cert and key go together")
    if len({d.key for d in config.destinations}) != len(config.destinations):
        raise NodeConfigError("destinations: listed twice")
