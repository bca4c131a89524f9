"""The node against real DICOM peers: dcmtk's storescu/echoscu as the modality, storescp and Orthanc
as destinations, all on loopback ports chosen at run time. Each test is skipped, with the reason,
when its peer is not installed (scripts/test.sh installs them with apt-get where it can)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from peers import (NODE_AE, NodeProcess, Orthanc, StoreSCP, _node_env, echoscu, free_port,
                   make_cxr, missing, node_config, read_uids, self_signed, storescu, wait_for)

DCMTK = missing("echoscu", "storescu", "storescp")
ORTHANC = missing("Orthanc")
needs_dcmtk = pytest.mark.skipif(DCMTK is not None, reason=str(DCMTK))
needs_orthanc = pytest.mark.skipif(DCMTK is not None or ORTHANC is not None,
                                   reason=str(DCMTK or ORTHANC))
DERIVED_DESCRIPTION = "Bone-suppressed (bsldm_fast, szch512)"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    if DCMTK or ORTHANC:
        pytest.skip(DCMTK or ORTHANC)
    server = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def storescp(tmp_path_factory):
    if DCMTK:
        pytest.skip(DCMTK)
    scp = StoreSCP(tmp_path_factory.mktemp("storescp") / "received")
    yield scp
    scp.stop()


@pytest.fixture(scope="module")
def node(tmp_path_factory, orthanc, storescp):
    """The node as deployed: chest only, one calling AE allowed, sending to Orthanc and storescp."""
    folder = tmp_path_factory.mktemp("node")
    config = node_config(folder / "spool", [orthanc.destination,
                                            f"{storescp.aet}@127.0.0.1:{storescp.port}"],
                         access='allowed_aets = ["MODALITY"]', filter_='body_parts = ["CHEST"]')
    process = NodeProcess(folder, config).start()
    yield process
    process.stop()


def _derived_series(orthanc: Orthanc, study_uid: str) -> list[dict]:
    return [s for s in orthanc.study_series(study_uid)
            if s["MainDicomTags"].get("SeriesDescription") == DERIVED_DESCRIPTION]


def _wait_derived(orthanc: Orthanc, study_uid: str, timeout: float = 120) -> dict:
    """The derived series once it holds an instance."""
    series = wait_for(lambda: [s for s in _derived_series(orthanc, study_uid) if s["Instances"]],
                      timeout, "the derived series in Orthanc", interval=0.25)
    return series[0]


def _stored_ok(result: subprocess.CompletedProcess) -> bool:
    return result.returncode == 0 and "Received Store Response (Success)" in result.stderr


def _wait_spool_empty(node: NodeProcess, timeout: float = 120) -> dict:
    def empty():
        status = node.status()
        return status if not (status["incoming"] or status["outgoing"]) else None
    return wait_for(empty, timeout, "the spool to empty", interval=0.3)


@needs_dcmtk
def test_echo(node):
    result = echoscu(node.port)
    assert result.returncode == 0, result.stderr
    # dcmtk versions word it "(Success)" or "(Status: 0x0000 - Success)".
    response = next((line for line in result.stderr.splitlines() if "Received Echo Response" in line), "")
    assert "Success" in response, result.stderr


@needs_dcmtk
def test_unknown_calling_ae_is_rejected_at_association(node, tmp_path):
    for result in (echoscu(node.port, aet="INTRUDER"),
                   storescu(node.port, [make_cxr(tmp_path / "a.dcm")], aet="INTRUDER")):
        assert result.returncode != 0
        assert "Association Rejected" in result.stderr
        assert "Calling AE Title Not Recognized" in result.stderr
    assert node.status()["incoming"] == []
    assert "calling AE 'INTRUDER') rejected" in node.text()


@needs_orthanc
def test_store_gives_derived_series_in_the_same_study(node, orthanc, storescp, tmp_path):
    source = make_cxr(tmp_path / "cxr.dcm")
    study_uid, sop_uid = read_uids(source)
    # The modality sends the original to the PACS and to the node (a routing rule in practice).
    assert _stored_ok(storescu(orthanc.dicom_port, [source], aec=orthanc.aet))
    assert _stored_ok(storescu(node.port, [source]))

    derived_series = _wait_derived(orthanc, study_uid)
    series = orthanc.study_series(study_uid)
    assert len(series) == 2 and len(derived_series["Instances"]) == 1
    original = next(s for s in series if s["ID"] != derived_series["ID"])
    derived = pydicom.dcmread(pydicom.filebase.DicomBytesIO(
        orthanc.instance_file(derived_series["Instances"][0])))
    sent = pydicom.dcmread(source)
    kept = pydicom.dcmread(pydicom.filebase.DicomBytesIO(
        orthanc.instance_file(original["Instances"][0])))
    np.testing.assert_array_equal(kept.pixel_array, sent.pixel_array)  # originals never altered
    assert derived.StudyInstanceUID == study_uid
    assert derived.SeriesInstanceUID != sent.SeriesInstanceUID
    assert derived.SOPInstanceUID != sop_uid and derived.SOPClassUID == sent.SOPClassUID
    assert list(derived.ImageType) == ["DERIVED", "SECONDARY"]
    assert derived.SourceImageSequence[0].ReferencedSOPInstanceUID == sop_uid
    assert derived.PatientID == sent.PatientID

    # Pixel data (and the derived UID) equal to what `bsldm-fast suppress` writes for this file.
    out = tmp_path / "cli"
    subprocess.run([sys.executable, "-m", "bsldm_fast.cli", "suppress", str(source), "-o",
                    str(out), "--model", "demo", "--sampler", "ddpm", "--steps", "2", "--device",
                    "cpu", "--batch-size", "1"], check=True, capture_output=True, env=_node_env(),
                   timeout=300)
    expected = pydicom.dcmread(out / "cxr.dcm")
    np.testing.assert_array_equal(derived.pixel_array, expected.pixel_array)
    assert derived.SOPInstanceUID == expected.SOPInstanceUID
    assert not np.array_equal(derived.pixel_array, sent.pixel_array)

    # The second destination, dcmtk's storescp, got the same instance.
    copies = wait_for(lambda: [p for p in storescp.files()
                               if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
                               == derived.SOPInstanceUID], 60, "storescp's copy")
    np.testing.assert_array_equal(pydicom.dcmread(copies[0]).pixel_array, derived.pixel_array)
    _wait_spool_empty(node)

    # Its own output sent back to it is acknowledged and never re-processed.
    again = tmp_path / "derived.dcm"
    derived.save_as(again)
    assert _stored_ok(storescu(node.port, [again]))
    assert f"{derived.SOPInstanceUID}: acknowledged, not processed: a derived instance written " \
           "by bsldm_fast" in node.text()
    assert node.status()["incoming"] == []


@needs_orthanc
@pytest.mark.parametrize("tool, args, propose, bits, expected", [
    ("dcmcrle", [], "-xr", 12, "1.2.840.10008.1.2.5"),        # RLE Lossless stays RLE
    ("dcmcjpeg", ["+eb"], "-xy", 8, "1.2.840.10008.1.2.1"),   # JPEG Baseline: never lossy again
])
def test_transfer_syntax_of_the_derived_instance(node, orthanc, tmp_path, tool, args, propose,
                                                 bits, expected):
    plain = make_cxr(tmp_path / "plain.dcm", size=256, bits=bits)
    source = tmp_path / "compressed.dcm"
    subprocess.run([tool, *args, str(plain), str(source)], check=True, capture_output=True)
    result = storescu(node.port, [source], options=(propose,))
    assert _stored_ok(result), result.stderr
    assert re.search(r"Converting transfer syntax: (.+) -> \1\n", result.stderr)  # as it is
    series = _wait_derived(orthanc, read_uids(source)[0])
    instance = series["Instances"][0]
    syntax = orthanc.get(f"/instances/{instance}/metadata/TransferSyntax", raw=True).decode()
    assert syntax == expected
    derived = pydicom.dcmread(pydicom.filebase.DicomBytesIO(orthanc.instance_file(instance)))
    assert derived.pixel_array.shape == (256, 256) and derived.BitsStored == bits


@needs_dcmtk
def test_non_chest_and_multiframe_are_acknowledged_not_processed(node, tmp_path):
    hand = make_cxr(tmp_path / "hand.dcm", BodyPartExamined="HAND")
    multi = make_cxr(tmp_path / "multi.dcm", size=64, frames=2)
    result = storescu(node.port, [hand, multi])
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("Received Store Response (Success)") == 2
    log = node.text()
    assert f"{read_uids(hand)[1]}: acknowledged, not processed: body part 'HAND'" in log
    assert f"{read_uids(multi)[1]}: acknowledged, not processed: multi-frame (2 frames)" in log
    journal = (node.folder / "spool" / "journal.jsonl").read_text()
    assert read_uids(hand)[1] not in journal and read_uids(multi)[1] not in journal
    assert "Phantom" not in log and "NODE-TEST" not in log  # logs name UIDs, never the patient


@needs_orthanc
def test_kill9_before_processing_then_restart_delivers_once(orthanc, tmp_path):
    # A batch that waits 10 minutes for company: the instance sits in the spool, acknowledged.
    node = NodeProcess(tmp_path, node_config(tmp_path / "spool", [orthanc.destination],
                                             max_wait_ms=600_000))
    node.start()
    source = make_cxr(tmp_path / "cxr.dcm", sample=1)
    study_uid, sop_uid = read_uids(source)
    assert _stored_ok(storescu(node.port, [source]))
    assert node.status()["incoming"] == [sop_uid]
    node.kill9()
    assert node.status()["incoming"] == [sop_uid]  # acknowledged means on disk

    node.start("--max-wait-ms", "0")
    try:
        series = _wait_derived(orthanc, study_uid)
        _wait_spool_empty(node)
        time.sleep(1.0)
        assert len(orthanc.get(f"/series/{series['ID']}/instances")) == 1
        assert len(orthanc.study_series(study_uid)) == 1
    finally:
        node.stop()


@needs_orthanc
def test_kill9_after_send_before_record_resends_without_duplicate(orthanc, tmp_path):
    # SIGKILL right after Orthanc confirmed, before the spool recorded it: the worst moment.
    node = NodeProcess(tmp_path, node_config(tmp_path / "spool", [orthanc.destination]),
                       env={"BSLDM_NODE_TEST_KILL_AFTER_SEND": "1"})
    node.start()
    source = make_cxr(tmp_path / "cxr.dcm", sample=2)
    study_uid, _ = read_uids(source)
    assert _stored_ok(storescu(node.port, [source]))
    assert node.wait_exit(timeout=120) == -9
    series = _wait_derived(orthanc, study_uid)
    assert len(node.status()["outgoing"]) == 1  # not recorded as delivered

    node.env.pop("BSLDM_NODE_TEST_KILL_AFTER_SEND")
    node.start()
    try:
        _wait_spool_empty(node)
        assert len(orthanc.get(f"/series/{series['ID']}/instances")) == 1
        assert len(orthanc.study_series(study_uid)) == 1
    finally:
        node.stop()
    assert '"event": "delivered"' in (tmp_path / "spool" / "journal.jsonl").read_text()


@needs_orthanc
def test_destination_down_is_retried_then_delivered(tmp_path):
    pacs = Orthanc(tmp_path / "orthanc")  # ports chosen, not started: the PACS is down
    node = NodeProcess(tmp_path, node_config(
        tmp_path / "spool", [pacs.destination],
        limits="retry_initial_s = 0.3\nretry_max_s = 1.0\ngive_up_after_s = 600"))
    node.start()
    try:
        source = make_cxr(tmp_path / "cxr.dcm")
        study_uid, _ = read_uids(source)
        assert _stored_ok(storescu(node.port, [source]))
        item = wait_for(lambda: [o for o in node.status()["outgoing"] if o["attempts"] >= 2], 120,
                        "two failed attempts")[0]
        assert "association failed" in item["last_error"]
        pacs.start()
        _wait_spool_empty(node)
        series = _wait_derived(pacs, study_uid, timeout=10)
        assert len(series["Instances"]) == 1
    finally:
        node.stop()
        pacs.stop()


@needs_dcmtk
def test_undeliverable_moves_to_failed_and_status_lists_it(tmp_path):
    dead = f"NOBODY@127.0.0.1:{free_port()}"
    node = NodeProcess(tmp_path, node_config(
        tmp_path / "spool", [dead],
        limits="retry_initial_s = 0.2\nretry_max_s = 0.5\ngive_up_after_s = 1.5"))
    node.start()
    try:
        source = make_cxr(tmp_path / "cxr.dcm")
        sop_uid = read_uids(source)[1]
        assert _stored_ok(storescu(node.port, [source]))
        failed = wait_for(lambda: node.status()["failed"], 120, "the item to move to failed/")
    finally:
        node.stop()
    assert failed[0]["item"] == sop_uid
    assert f"not delivered to {dead}" in failed[0]["reason"]
    folder = tmp_path / "spool" / "failed" / sop_uid
    assert (folder / "soft.dcm").is_file() and (folder / "reason.txt").is_file()
    text = subprocess.run([sys.executable, "-m", "bsldm_fast.cli", "serve", "--config",
                           str(node.config), "--status"], capture_output=True, text=True,
                          env=node.env, check=True).stdout
    assert "failed: 1" in text and sop_uid in text and "not delivered" in text


@needs_dcmtk
def test_spool_disk_above_threshold_gets_out_of_resources(tmp_path):
    node = NodeProcess(tmp_path, node_config(tmp_path / "spool", [f"X@127.0.0.1:{free_port()}"],
                                             limits="max_disk_percent = 0.0"))
    node.start()
    try:
        result = storescu(node.port, [make_cxr(tmp_path / "cxr.dcm")])
    finally:
        node.stop()
    assert "Received Store Response (Refused: OutOfResources)" in result.stderr
    assert "refused with 0xA700 (out of resources)" in node.text()
    assert list((tmp_path / "spool" / "incoming").iterdir()) == []


@needs_orthanc
def test_readme_orthanc_routing_rule_sends_chest_radiographs_to_the_node(tmp_path):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    lua = re.search(r"```lua\n(.*?)```", readme[readme.index("### Running as a DICOM node"):],
                    re.S)[1]
    pacs = Orthanc(tmp_path / "orthanc")
    node = NodeProcess(tmp_path, node_config(tmp_path / "spool", [pacs.destination],
                                             access='allowed_aets = ["ORTHANC"]'))
    node.start()
    try:
        pacs.configure(modalities={"bsldm": [NODE_AE, "127.0.0.1", node.port]}, lua=lua)
        pacs.start()
        chest, hand = make_cxr(tmp_path / "chest.dcm"), make_cxr(tmp_path / "hand.dcm",
                                                                  BodyPartExamined="HAND")
        # The modality sends to the PACS only; the PACS routes the chest radiograph to the node.
        assert _stored_ok(storescu(pacs.dicom_port, [chest, hand], aec=pacs.aet))
        _wait_derived(pacs, read_uids(chest)[0])
        _wait_spool_empty(node)
        time.sleep(2.0)  # time for a wrongly routed derived instance to come back
        assert len(pacs.study_series(read_uids(chest)[0])) == 2
        assert len(pacs.study_series(read_uids(hand)[0])) == 1
        assert pacs.count_instances() == 3
        received = node.text().count(": received from ORTHANC")
        assert received == 1, node.text()  # the derived series was not routed back
    finally:
        node.stop()
        pacs.stop()


@pytest.mark.skipif(DCMTK is not None or shutil.which("openssl") is None,
                    reason=str(DCMTK or "openssl is not installed"))
def test_tls_both_ways_and_the_bone_series(tmp_path):
    key, cert = self_signed(tmp_path)
    scp = StoreSCP(tmp_path / "received", tls=(key, cert))
    node = NodeProcess(tmp_path, node_config(
        tmp_path / "spool", [f"{scp.aet}@127.0.0.1:{scp.port}"], extra="bone = true",
        tls=f'cert = "{cert}"\nkey = "{key}"\nca = "{cert}"'))
    node.start()
    try:
        source = make_cxr(tmp_path / "cxr.dcm")
        assert not _stored_ok(storescu(node.port, [source]))  # plain TCP to a TLS node: refused
        assert _stored_ok(storescu(node.port, [source], tls=(key, cert)))
        _wait_spool_empty(node)
        files = wait_for(lambda: len(scp.files()) == 2 and scp.files(), 30, "storescp's copies")
        derived = [pydicom.dcmread(f) for f in files]
        assert sorted(d.SeriesDescription for d in derived) == [
            "Bone image (bsldm_fast, szch512)", DERIVED_DESCRIPTION]
        assert len({d.SeriesInstanceUID for d in derived}) == 2
        for d in derived:
            assert d.SourceImageSequence[0].ReferencedSOPInstanceUID == read_uids(source)[1]
    finally:
        node.stop()
        scp.stop()


@needs_dcmtk
def test_address_not_in_allowed_hosts_is_refused(tmp_path):
    node = NodeProcess(tmp_path, node_config(tmp_path / "spool", [f"X@127.0.0.1:{free_port()}"],
                                             access='allowed_hosts = ["192.0.2.1"]'))
    node.start()
    try:
        result = echoscu(node.port)
    finally:
        node.stop()
    assert result.returncode != 0 and "Echo Response" not in result.stderr
    assert "connection from 127.0.0.1 refused: not in access.allowed_hosts" in node.text()
