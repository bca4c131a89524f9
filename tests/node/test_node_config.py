"""The node's config: TOML -> frozen dataclasses, every key and type checked, flags override."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from bsldm_fast.node.config import (Destination, NodeConfig, NodeConfigError, load_config,
                                    replace)

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_config_loads(tmp_path):
    text = README.read_text()
    section = text[text.index("### Running as a DICOM node"):]
    toml = re.search(r"```toml\n(.*?)```", section, re.S)[1]
    path = tmp_path / "node.toml"
    path.write_text(toml)
    config = load_config(path)
    assert config.ae_title == "BSLDM_FAST" and config.port == 11112
    assert config.filter.body_parts == ("CHEST",)
    assert config.access.allowed_aets == ("ORTHANC", "CR_ROOM1")
    assert config.limits.max_disk_percent == 90.0
    assert config.destinations == (Destination("ORTHANC", "pacs.example", 4242),)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 1


@pytest.mark.parametrize("text, message", [
    ("prot = 1", "unknown key 'prot'"),
    ("port = '11112'", "port: expected an integer"),
    ("[model]\nsteps = 2.5", "model.steps: expected an integer"),
    ("[filter]\nmodalities = 'DX'", "filter.modalities: expected a list of strings"),
    ("[limits]\nmax_disk_percent = 120", "max_disk_percent: expected 0-100"),
    ("ae_title = 'A\\\\B'", "is not an AE title"),
    ("ae_title = 'SEVENTEEN_CHARS_X'", "is not an AE title"),
    ("[[destinations]]\nae_title = 'X'\nhost = 'h'\nport = 70000", "is not a TCP port"),
    ("[[destinations]]\nae_title = 'X'\nhost = 'h'", "destinations"),
    ("version = 2", "version"),
    ("port = ", "not valid TOML"),
])
def test_bad_configs_name_the_field(tmp_path, text, message):
    path = tmp_path / "node.toml"
    path.write_text(text)
    with pytest.raises(NodeConfigError, match=re.escape(message)):
        load_config(path)


def test_flags_override_sections():
    config = replace(NodeConfig(), port=0, batch_size=None, **{"model.steps": 3,
                                                               "limits.retry_max_s": 5.0})
    assert config.port == 0 and config.batch_size == 4
    assert config.model.steps == 3 and config.model.path == "demo"
    assert config.limits.retry_max_s == 5.0 and config.limits.retry_initial_s == 2.0


def test_destination_flag():
    assert Destination.parse("PACS@10.0.0.1:104").key == "PACS@10.0.0.1:104"
    with pytest.raises(NodeConfigError, match="AE@host:port"):
        Destination.parse("PACS:104")
