"""The spool: durable receive, commit, failure with a reason, recovery after a crash; the filter."""

from __future__ import annotations

import os

import pydicom
import pytest

from bsldm_fast.node.config import FilterSettings
from bsldm_fast.node.filter import is_own_output, skip_reason
from bsldm_fast.node.sender import backoff
from bsldm_fast.node.config import Limits
from bsldm_fast.node.spool import ItemState, Spool, item_name

UID = "1.2.3.4.5"


def _state(received: float) -> ItemState:
    return ItemState(source=UID, received=received, processed=received + 1, files=["soft.dcm"],
                     pending=["PACS@h:1"])


def test_receive_commit_done(tmp_path):
    spool = Spool(tmp_path)
    path = spool.receive(UID, b"data")
    assert path.read_bytes() == b"data" and spool.incoming() == [UID]
    assert list(spool.tmp_dir.iterdir()) == []
    spool.commit(UID, {"soft.dcm": b"derived"}, _state(path.stat().st_mtime))
    assert spool.incoming() == [] and spool.outgoing() == [UID]
    assert spool.file(UID, "soft.dcm").read_bytes() == b"derived"
    state = spool.state(UID)
    state.pending = []
    spool.done(UID, state)
    assert spool.outgoing() == [] and list(spool.tmp_dir.iterdir()) == []
    events = [line.split('"event": "')[1].split('"')[0]
              for line in (tmp_path / "journal.jsonl").read_text().splitlines()]
    assert events == ["received", "processed", "delivered"]


def test_recover_after_a_crash_between_commit_and_unlink(tmp_path):
    spool = Spool(tmp_path)
    path = spool.receive(UID, b"data")
    mtime = path.stat().st_mtime
    spool.commit(UID, {"soft.dcm": b"derived"}, _state(mtime))
    spool.receive(UID, b"data")  # as if the unlink never happened...
    os.utime(spool.incoming_path(UID), (mtime, mtime))  # ...same file, same time
    (spool.tmp_dir / "x.part").write_bytes(b"half")  # and a half-written file
    report = Spool(tmp_path).recover()
    assert report == {"tmp_removed": 1, "duplicates_removed": 1, "incoming": 0, "outgoing": 1}


def test_a_newer_copy_of_a_delivered_source_is_kept(tmp_path):
    spool = Spool(tmp_path)
    spool.receive(UID, b"data")
    spool.commit(UID, {"soft.dcm": b"derived"}, _state(0.0))
    spool.receive(UID, b"sent again later")
    assert spool.recover()["duplicates_removed"] == 0 and spool.incoming() == [UID]


def test_fail_keeps_everything_with_the_reason(tmp_path):
    spool = Spool(tmp_path)
    spool.receive(UID, b"data")
    folder = spool.fail(UID, "cannot be processed: broken")
    assert (folder / "source.dcm").read_bytes() == b"data"
    assert spool.failed() == [(UID, "cannot be processed: broken")]
    assert spool.status()["failed"] == [{"item": UID, "reason": "cannot be processed: broken"}]
    spool.receive(UID, b"again")
    assert spool.fail(UID, "twice").name == f"{UID}.2"


def test_item_names_are_safe():
    assert item_name(" 1.2.840.1 ") == "1.2.840.1"
    for bad in ("../../etc/passwd", "1.2.x", "1." * 40):
        name = item_name(bad)
        assert name.startswith("x") and "/" not in name and len(name) == 41


def test_backoff_doubles_up_to_the_limit():
    limits = Limits(retry_initial_s=1.0, retry_max_s=5.0)
    assert [backoff(n, limits) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def _ds(**tags):
    ds = pydicom.Dataset()
    ds.Modality, ds.SamplesPerPixel, ds.PhotometricInterpretation = "DX", 1, "MONOCHROME2"
    ds.PixelData = b"\0\0"
    for key, value in tags.items():
        setattr(ds, key, value)
    return ds


@pytest.mark.parametrize("tags, reason", [
    ({"BodyPartExamined": "CHEST", "ViewPosition": "PA"}, None),
    ({}, "body part missing"),
    ({"Modality": "CT"}, "modality 'CT'"),
    ({"NumberOfFrames": 3}, "multi-frame (3 frames)"),
    ({"PhotometricInterpretation": "RGB", "SamplesPerPixel": 3}, "not grey-scale"),
    ({"BodyPartExamined": "HAND"}, "body part 'HAND'"),
    ({"BodyPartExamined": "CHEST", "ViewPosition": "LL"}, "view position 'LL'"),
    ({"ImageType": ["DERIVED", "SECONDARY"],
      "DerivationDescription": "Bone-suppressed by bsldm_fast 0.1.0: ..."},
     "written by bsldm_fast"),
])
def test_filter(tags, reason):
    settings = FilterSettings(body_parts=("CHEST",), view_positions=("PA", "AP"))
    got = skip_reason(_ds(**tags), settings)
    assert (got is None) if reason is None else (reason in got)


def test_other_derived_images_are_not_mistaken_for_own_outputs():
    assert not is_own_output(_ds(ImageType=["DERIVED", "PRIMARY"], DerivationDescription="CAD"))


def test_one_node_per_spool(tmp_path):
    Spool(tmp_path).lock()
    with pytest.raises(OSError, match=f"in use by another node \\(pid {os.getpid()}\\)"):
        Spool(tmp_path).lock()
