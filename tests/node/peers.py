"""Real DICOM peers for the node tests and the load benchmark: dcmtk (echoscu, storescu, storescp)
and Orthanc, started on loopback ports chosen at run time with a temporary config and storage
folder (never the system service), and the node itself as a `bsldm-fast serve` subprocess."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "assets" / "szch_samples" / "cxr"
NODE_AE = "BSLDM_FAST"
MODALITY_AE = "MODALITY"
ORTHANC_AE = "ORTHANC"


def tool(name: str) -> str | None:
    """The path of dcmtk's or Orthanc's `name`. pynetdicom installs Python apps with dcmtk's names
    (echoscu, storescu, storescp) into the environment's bin folder, which an activated venv puts
    first on PATH; their options differ, so that folder is passed over."""
    env_bin = Path(sys.prefix, "bin").resolve()
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p).resolve() != env_bin]
    return shutil.which(name, path=os.pathsep.join(path))


def missing(*tools: str) -> str | None:
    """Why a test cannot run here: the first tool not on PATH, with how to install it."""
    for tool_name in tools:
        if tool(tool_name) is None:
            package = "orthanc" if tool_name == "Orthanc" else "dcmtk"
            return (f"{tool_name} is not installed (apt-get install {package}; scripts/test.sh installs "
                    "it where apt-get works)")
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    """Poll `predicate` until it returns something truthy; AssertionError naming `what` if not."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


# Test images ---------------------------------------------------------------------------------

def make_cxr(path: Path, sample: int = 0, size: int = 512, frames: int = 1, bits: int = 12,
             **tags) -> Path:
    """A DX chest radiograph (12 bits stored, or 8 in 8 allocated) from a bundled SZCH sample,
    new UIDs each call."""
    from PIL import Image

    from dicom_factory import make_dicom

    image = Image.open(SAMPLES / f"{sample}.png").convert("L").resize((size, size))
    pixels = np.asarray(image, dtype=np.uint8) if bits == 8 else \
        (np.asarray(image, dtype=np.uint16) * 16).astype(np.uint16)
    if frames > 1:
        pixels = np.stack([pixels] * frames)
    chest = {"PatientName": "Phantom^Chest", "PatientID": "NODE-TEST", "BodyPartExamined": "CHEST",
             "ViewPosition": "PA", "SeriesNumber": 1, "InstanceNumber": 1,
             "WindowCenter": 2 ** (bits - 1), "WindowWidth": 2**bits}
    return make_dicom(path, pixels, bits_stored=bits, **{**chest, **tags})


def read_uids(path: Path) -> tuple[str, str]:
    """(StudyInstanceUID, SOPInstanceUID) of a file."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)


# dcmtk -----------------------------------------------------------------------------------------

def storescu(port: int, files, aet: str = MODALITY_AE, aec: str = NODE_AE,
             timeout: float = 120, tls: tuple[Path, Path] | None = None,
             options: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """dcmtk storescu -v: the modality sending `files` to the node (over TLS with (key, cert),
    which is also the CA)."""
    return subprocess.run([tool("storescu"), "-v", *options, *_tls_flags(tls), "-aet", aet, "-aec", aec,
                           "127.0.0.1", str(port), *map(str, files)], capture_output=True,
                          text=True, timeout=timeout)


def _tls_flags(tls: tuple[Path, Path] | None) -> list[str]:
    return [] if tls is None else ["+tls", str(tls[0]), str(tls[1]), "+cf", str(tls[1])]


def self_signed(folder: Path) -> tuple[Path, Path]:
    """(key, certificate) for 127.0.0.1, made with the openssl command."""
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return key, cert


def echoscu(port: int, aet: str = MODALITY_AE, aec: str = NODE_AE) -> subprocess.CompletedProcess:
    return subprocess.run([tool("echoscu"), "-v", "-aet", aet, "-aec", aec, "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=60)


class StoreSCP:
    """dcmtk storescp: a plain destination writing what it receives into a folder."""

    def __init__(self, folder: Path, aet: str = "STORESCP", tls: tuple[Path, Path] | None = None):
        self.folder, self.aet, self.port = folder, aet, free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.log = open(folder.parent / f"storescp-{self.port}.log", "w")
        self.process = subprocess.Popen([tool("storescp"), *_tls_flags(tls), "-aet", self.aet, "-od",
                                         str(folder), str(self.port)], stdout=self.log,
                                        stderr=subprocess.STDOUT)
        wait_for(lambda: _listening(self.port), 20, f"storescp on port {self.port}")

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        self.log.close()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


# Orthanc ---------------------------------------------------------------------------------------

class Orthanc:
    """An Orthanc PACS on loopback, with its own config and storage under `folder`. The ports are
    chosen when the object is made, so a node can be pointed at it before it is started."""

    def __init__(self, folder: Path, aet: str = ORTHANC_AE):
        self.folder, self.aet = folder, aet
        self.dicom_port, self.http_port = free_port(), free_port()
        self.process: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)
        self.config = folder / "orthanc.json"
        self.configure()

    def configure(self, modalities: dict | None = None, lua: str | None = None) -> None:
        """(Re)write the config: `modalities` (Orthanc's DicomModalities), a Lua script."""
        folder = self.folder
        scripts = []
        if lua is not None:
            (folder / "route.lua").write_text(lua)
            scripts = [str(folder / "route.lua")]
        self.config.write_text(json.dumps({
            "Name": "bsldm-node-test", "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "index"), "DicomAet": self.aet,
            "DicomPort": self.dicom_port, "HttpPort": self.http_port, "HttpServerEnabled": True,
            "DicomServerEnabled": True, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "Plugins": [],
            "StorageCompression": False, "DicomModalities": modalities or {},
            "LuaScripts": scripts,
        }))

    @property
    def destination(self) -> str:
        return f"{self.aet}@127.0.0.1:{self.dicom_port}"

    def start(self) -> "Orthanc":
        self.log = open(self.folder / "orthanc.log", "ab")
        self.process = subprocess.Popen([tool("Orthanc"), str(self.config)], stdout=self.log,
                                        stderr=subprocess.STDOUT, cwd=self.folder)
        wait_for(self._up, 60, f"Orthanc on ports {self.dicom_port}/{self.http_port}")
        wait_for(lambda: _listening(self.dicom_port), 30, "Orthanc's DICOM port")
        return self

    def _up(self):
        if self.process.poll() is not None:
            raise AssertionError(f"Orthanc exited with {self.process.returncode}; see "
                                 f"{self.folder / 'orthanc.log'}")
        try:
            return self.get("/system")
        except (urllib.error.URLError, ConnectionError, OSError):
            return None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.log.close()
        self.process = None

    def _request(self, path: str, data: bytes | None = None, raw: bool = False):
        url = f"http://127.0.0.1:{self.http_port}{path}"
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=30) as r:
            body = r.read()
        return body if raw else json.loads(body)

    def get(self, path: str, raw: bool = False):
        return self._request(path, raw=raw)

    def post(self, path: str, data: bytes):
        return self._request(path, data=data)

    def study_series(self, study_uid: str) -> list[dict]:
        """The series Orthanc holds in the study `study_uid` (each with its MainDicomTags and
        instance ids); [] when it has no such study."""
        hits = [h for h in self.post("/tools/lookup", study_uid.encode()) if h["Type"] == "Study"]
        if not hits:
            return []
        return self.get(f"/studies/{hits[0]['ID']}/series")

    def instance_file(self, instance_id: str) -> bytes:
        return self.get(f"/instances/{instance_id}/file", raw=True)

    def instance_tags(self, instance_id: str) -> dict:
        return self.get(f"/instances/{instance_id}/simplified-tags")

    def count_instances(self) -> int:
        return len(self.get("/instances"))


# The node --------------------------------------------------------------------------------------

def _node_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # two shared cores: the tests never take more than one
    return env


class NodeProcess:
    """`bsldm-fast serve` as a subprocess (so it can be killed with SIGKILL), on a free port."""

    def __init__(self, folder: Path, config_text: str, env: dict | None = None,
                 name: str = "node"):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.config = folder / f"{name}.toml"
        self.config.write_text(config_text)
        self.log_path = folder / f"{name}.log"
        self.env = {**_node_env(), **(env or {})}
        self.process: subprocess.Popen | None = None
        self.port = 0

    def start(self, *extra: str) -> "NodeProcess":
        self.log = open(self.log_path, "a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bsldm_fast.cli", "serve", "--config", str(self.config),
             "--port", "0", *extra], stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        line = wait_for(self._listening_line, 90, "the node to listen")
        self.port = int(line.split(" listening on ")[1].split(",")[0].rsplit(":", 1)[1])
        return self

    def _listening_line(self):
        if self.process.poll() is not None:
            raise AssertionError(f"the node exited with {self.process.returncode}:\n" + self.text())
        for line in reversed(self.text().splitlines()):
            if line.startswith("bsldm-fast serve:") and " listening on " in line:
                return line
        return None

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self) -> dict:
        out = subprocess.run([sys.executable, "-m", "bsldm_fast.cli", "serve", "--config",
                              str(self.config), "--status", "--json"], capture_output=True,
                             text=True, env=self.env, timeout=60, check=True)
        return json.loads(out.stdout)

    def kill9(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self.log.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None:
            self.log.close()
        self.process = None

    def wait_exit(self, timeout: float) -> int:
        code = self.process.wait(timeout=timeout)
        self.log.close()
        return code


def node_config(spool: Path, destinations: list[str], *, steps: int = 2, batch_size: int = 4,
                max_wait_ms: int = 100, extra: str = "", limits: str = "", access: str = "",
                filter_: str = "", tls: str = "") -> str:
    """A node TOML for the tests: the demo model, DDPM with few steps, one torch thread. With a
    [tls] section (`tls`), the destinations are reached over TLS too."""
    dests = "\n".join(
        f'[[destinations]]\nae_title = "{d.split("@")[0]}"\nhost = "127.0.0.1"\n'
        f'port = {d.rsplit(":", 1)[1]}\ntls = {"true" if tls else "false"}\n'
        for d in destinations)
    return f"""
ae_title = "{NODE_AE}"
host = "127.0.0.1"
spool = "{spool}"
batch_size = {batch_size}
max_wait_ms = {max_wait_ms}
{extra}

[model]
path = "demo"
device = "cpu"
sampler = "ddpm"
steps = {steps}
threads = 1

[access]
{access}

[filter]
{filter_}

[limits]
{limits}

{"[tls]" if tls else ""}
{tls}

{dests}
"""
