"""Issue 18 for real: `torchrun --nproc_per_node 2 -m bsldm_fast.cli suppress` on the CPU (gloo),
the bundled demo model with 2 steps on 10 small PNGs (8- and 16-bit), one thread a process.

- the outputs of 2 ranks are byte-identical to a single process's (same batch size), and rank 0
  writes one merged report;
- a rank SIGKILLed mid-run: torchrun stops the other, whose rank 0 still writes a report in which
  the dead rank's unfinished inputs are "not attempted" and every "written" output is on disk;
  `--skip-existing` then finishes the job with the single process's outputs.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch.distributed

from bsldm_fast.io import write_image
from bsldm_fast.io.batch import LOCK_NAME, REPORT_NAME
from bsldm_fast.io.ranks import journal_path, stale_journals

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="this torch build has no torch.distributed")

ROOT = Path(__file__).resolve().parents[2]
NAMES = [f"{i:02d}.png" for i in range(10)]
MODEL = ["--model", "demo", "--steps", "2", "--device", "cpu"]


def _command(inputs, out, *extra, ranks=1):
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(ranks), "-m", "bsldm_fast.cli"] if ranks > 1
              else [sys.executable, "-m", "bsldm_fast.cli"])
    return launch + ["suppress", str(inputs), "-o", str(out), *MODEL, *extra]


def _env():  # and cwd=ROOT: `python -m` puts the working folder first on sys.path
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _run(inputs, out, *extra, ranks=1):
    done = subprocess.run(_command(inputs, out, *extra, ranks=ranks), capture_output=True, text=True,
                          timeout=300, env=_env(), cwd=ROOT)
    return done.returncode, done.stderr


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("in")
    rng = np.random.default_rng(18)
    for i, name in enumerate(NAMES):
        dtype = np.uint8 if i % 2 else np.uint16
        size = (48 + 4 * i, 64 - 2 * i)
        write_image(folder / name, rng.integers(0, np.iinfo(dtype).max, size, dtype=dtype))
    return folder


def _single(inputs, tmp_path_factory, batch):
    out = tmp_path_factory.mktemp(f"single{batch}")
    code, err = _run(inputs, out, "--batch-size", str(batch))
    assert code == 0, err
    return out


def _report(out):
    return json.loads((out / REPORT_NAME).read_text())


def _differing_outputs(a, b):
    return [name for name in NAMES if (a / name).read_bytes() != (b / name).read_bytes()]


def test_two_ranks_write_what_one_process_writes_and_one_report(inputs, tmp_path_factory,
                                                                 tmp_path):
    single = _single(inputs, tmp_path_factory, 2)
    out = tmp_path / "out"
    code, err = _run(inputs, out, "--batch-size", "2", ranks=2)
    assert code == 0, err
    assert _differing_outputs(single, out) == []  # bit for bit: each batch is the single run's
    report = _report(out)
    assert report["complete"] and report["world_size"] == 2
    assert report["counts"] == {"total": 10, "written": 10, "skipped": 0, "failed": 0}
    assert [(r["rank"], r["status"], r["images"]) for r in report["ranks"]] == \
        [(0, "finished", 4), (1, "finished", 6)]
    assert [Path(r["source"]).name for r in report["results"]] == NAMES
    assert sorted(os.listdir(out)) == sorted(NAMES + [REPORT_NAME])  # no journal, no lock left
    assert "rank 1: 6 of its 6 images written" in err


def test_a_rank_killed_mid_run_then_skip_existing_finishes_the_job(inputs, tmp_path_factory,
                                                                   tmp_path):
    single = _single(inputs, tmp_path_factory, 1)
    out = tmp_path / "out"
    job = subprocess.Popen(_command(inputs, out, "--batch-size", "1", ranks=2), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, env=_env(), cwd=ROOT)
    try:
        journal, deadline = journal_path(out, 1), time.monotonic() + 240
        while True:  # rank 1 has finished one image (its journal: a header and one line)
            assert job.poll() is None and time.monotonic() < deadline, "rank 1 never started"
            lines = journal.read_text().splitlines() if journal.exists() else []
            if len(lines) >= 2:
                break
            time.sleep(0.02)
        os.kill(json.loads(lines[0])["pid"], signal.SIGKILL)
        log, _ = job.communicate(timeout=120)
    finally:
        job.kill()
    assert job.returncode != 0
    report = _report(out)
    assert not report["complete"], log
    ranks = {r["rank"]: r for r in report["ranks"]}
    assert ranks[1]["status"] == "lost" and ranks[0]["status"] in ("interrupted", "finished")
    share1 = [r for r in report["results"] if Path(r["source"]).name in NAMES[5:]]
    assert len(share1) == 5 and sum(r["status"] == "not attempted" for r in share1) >= 3
    assert any("rank 1 stopped before finishing" in (r["reason"] or "") for r in share1)
    for entry in report["results"]:
        if entry["status"] == "written":
            assert all(Path(p).is_file() for p in entry["outputs"]) and entry["outputs"]
        else:
            assert entry["status"] == "not attempted"
    assert not (out / LOCK_NAME).exists()

    code, err = _run(inputs, out, "--batch-size", "1", "--skip-existing", ranks=2)
    assert code == 0, err
    report = _report(out)
    assert report["complete"] and report["counts"]["failed"] == 0
    assert report["counts"]["written"] + report["counts"]["skipped"] == 10
    assert report["counts"]["written"] >= 3
    assert all(r["outputs"] == [str(out / Path(r["source"]).name)] for r in report["results"])
    assert _differing_outputs(single, out) == []
    assert stale_journals(out) == [] and not list(out.glob(".*.part"))
