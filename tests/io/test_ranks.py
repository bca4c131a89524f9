"""Issue 18: the ranks of a job share one batch run (io/ranks.py, io/batch.py).

The ranks here are threads of one process exchanging pickled messages (what torch.distributed
does between processes), so the split, the lock, the journals and the merge are tested in a
second; tests/distributed/ runs the same code as real processes under torchrun.
"""

import json
import os
import pickle
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from bsldm_fast.io import BatchOptions, ImageError, Provenance, run_batch, write_image
from bsldm_fast.io import batch as batch_module
from bsldm_fast.io.batch import LOCK_NAME, REPORT_NAME, Outcome, prepare_output
from bsldm_fast.io.images import find_images
from bsldm_fast.io.ranks import (Journal, journal_path, read_journal, split, stale_journals,
                                 wait_for_journals)

PROV = Provenance(model="m", sampler="ddim", steps=3, seed=0, version="0", name="t")
OPTS = BatchOptions(progress=False)


def darker(units):
    return [u * 0.75 for u in units]


def _images(folder, count, size=(40, 40)):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(count)
    for i in range(count):
        write_image(folder / f"{i:02d}.png", rng.integers(0, 256, size, dtype=np.uint8))
    return folder


class _Rank:
    """One rank of a job whose ranks are threads; messages are pickled, as between processes."""

    def __init__(self, hub, rank):
        self.hub, self.rank, self.world = hub, rank, hub["world"]

    def all_gather(self, obj):
        self.hub["slots"][self.rank] = pickle.dumps(obj)
        self.hub["barrier"].wait()
        out = [pickle.loads(s) for s in self.hub["slots"]]
        self.hub["barrier"].wait()
        return out

    def scatter(self, objs):
        return self.all_gather(objs if self.rank == 0 else None)[0][self.rank]

    def barrier(self):
        self.hub["barrier"].wait()


def _job(world, work):
    """Run `work(rank)` on `world` thread-ranks; each rank's return value or exception."""
    hub = {"world": world, "slots": [None] * world, "barrier": threading.Barrier(world, timeout=30)}

    def run(rank):
        try:
            return work(rank)
        except Exception:
            raise  # an error every rank learned of through a message: all stop together
        except BaseException:
            hub["barrier"].abort()  # a "killed" rank: as a dead process's closed connections do
            raise

    with ThreadPoolExecutor(world) as pool:
        futures = [pool.submit(run, _Rank(hub, r)) for r in range(world)]
    return [f.exception() or f.result() for f in futures]


# --- the split ------------------------------------------------------------------------------------

@pytest.mark.parametrize("count,world,batch", [(10, 2, 1), (10, 2, 4), (10, 3, 2), (3, 4, 1),
                                               (0, 2, 4), (1000, 7, 16)])
def test_the_split_is_contiguous_on_batch_boundaries_and_balanced(count, world, batch):
    shares = split(count, world, batch)
    assert shares == split(count, world, batch)  # deterministic
    assert len(shares) == world and [i for s in shares for i in s] == list(range(count))
    for share in shares[:-1]:
        assert share.stop % batch == 0 or share.stop == count  # a single process's batches
    sizes = [len(s) for s in shares]
    assert max(sizes) - min(sizes) <= batch


# --- the journals ---------------------------------------------------------------------------------

def test_a_journal_lists_what_was_finished_and_ignores_a_torn_line_or_another_job(tmp_path):
    path = journal_path(tmp_path, 1)
    journal = Journal(path, "job-a", 1)
    journal.record(4, Outcome("in/4.png", "written", outputs=["out/4.png"]))
    journal.record(5, Outcome("in/5.png", "failed", reason="bad"))
    journal.close()
    with open(path, "a") as handle:
        handle.write('{"index": 6, "outc')  # killed while writing
    head, done, end = read_journal(path, "job-a")
    assert head["rank"] == 1 and head["pid"] == os.getpid()
    assert sorted(done) == [4, 5] and done[4]["status"] == "written" and end is None
    assert read_journal(path, "job-b") == (None, {}, None)
    assert read_journal(tmp_path / "none.jsonl", "job-a") == (None, {}, None)
    assert stale_journals(tmp_path) == [path]


def test_rank_0_does_not_wait_for_a_rank_whose_process_is_gone(tmp_path):
    Journal(journal_path(tmp_path, 1), "job", 1).close()
    lines = journal_path(tmp_path, 1).read_text().splitlines()
    head = json.loads(lines[0])
    head["pid"] = 2**22 + 12345  # above pid_max's default: no such process
    journal_path(tmp_path, 1).write_text(json.dumps(head) + "\n")
    slept = []
    journals = wait_for_journals(tmp_path, "job", [1], grace_s=30, sleep=slept.append)
    assert slept == [] and journals[1][2] is None


# --- a job of two ranks ---------------------------------------------------------------------------

def test_two_ranks_write_every_image_once_and_rank_0_merges_one_report(tmp_path):
    inputs, out = _images(tmp_path / "in", 10), tmp_path / "out"
    calls = {0: [], 1: []}

    def rank(group):
        def suppress(units):
            calls[group.rank].append(len(units))
            return darker(units)
        return run_batch(suppress, PROV, [inputs], out, OPTS, batch_size=2, group=group)

    first, second = _job(2, rank)
    assert calls == {0: [2, 2], 1: [2, 2, 2]}  # 5 batches of 2, split 2 + 3
    assert first.rank == 0 and first.ok and first.job_ok and second.job_ok
    assert len(first.outcomes) == 10 and len(second.outcomes) == 6
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["complete"] and report["counts"] == {"total": 10, "written": 10, "skipped": 0,
                                                       "failed": 0}
    assert report["world_size"] == 2 and [r["images"] for r in report["ranks"]] == [4, 6]
    assert [r["status"] for r in report["ranks"]] == ["finished"] * 2
    assert [Path(r["outputs"][0]).name for r in report["results"]] == \
        [f"{i:02d}.png" for i in range(10)]
    single = run_batch(darker, PROV, [inputs], tmp_path / "single", OPTS, batch_size=2)
    for name in (f"{i:02d}.png" for i in range(10)):
        assert (out / name).read_bytes() == (tmp_path / "single" / name).read_bytes()
    assert sorted(os.listdir(out)) == sorted([REPORT_NAME] + [f"{i:02d}.png" for i in range(10)])
    assert single.ok and "ranks" not in json.loads((tmp_path / "single" / REPORT_NAME).read_text())


def test_a_job_resumes_with_skip_existing_and_the_split_follows_what_is_left(tmp_path):
    inputs, out = _images(tmp_path / "in", 10), tmp_path / "out"
    run_batch(darker, PROV, [inputs / f"{i:02d}.png" for i in (0, 1, 2, 7)], out, OPTS)
    options = BatchOptions(skip_existing=True, progress=False)
    first, _ = _job(2, lambda g: run_batch(darker, PROV, [inputs], out, options, 1, group=g))
    assert first.ok and [len(o.kept) for o in first.outcomes] == [1, 1, 1, 0, 0, 0, 0, 1, 0, 0]
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["counts"]["written"] == 6 and report["counts"]["skipped"] == 4
    assert [r["images"] for r in report["ranks"]] == [3, 3]


def test_a_rank_lost_mid_run_leaves_its_unfinished_inputs_not_attempted(tmp_path, monkeypatch):
    inputs, out = _images(tmp_path / "in", 6), tmp_path / "out"
    dead = threading.Event()  # rank 1 is "SIGKILLed": from then on it writes nothing

    class Killed(BaseException):
        pass

    real_record, real_end = batch_module.Journal.record, batch_module.Journal.end

    def record(self, *args):
        if not (dead.is_set() and "rank1" in self.path.name):
            real_record(self, *args)

    def end(self, *args):
        if dead.is_set() and "rank1" in self.path.name:
            self.close()
            raise Killed
        real_end(self, *args)

    monkeypatch.setattr(batch_module.Journal, "record", record)
    monkeypatch.setattr(batch_module.Journal, "end", end)
    # rank 1 "died" but is a thread of this live process: rank 0 cannot tell, so it waits the grace
    monkeypatch.setattr(batch_module, "MERGE_GRACE_S", 0.5)

    def rank(group):
        def suppress(units):
            if group.rank == 1 and calls:  # dies in its second batch, its first being written
                dead.set()
                raise Killed
            calls.append(len(units))
            return darker(units)
        calls = []
        return run_batch(suppress, PROV, [inputs], out, OPTS, batch_size=1, group=group)

    first, second = _job(2, rank)
    assert isinstance(second, Killed)
    # rank 0 finished its share; at the barrier it learns rank 1 is gone
    assert not first.ok and first.lost == [1] and first.job_ok is None
    report = json.loads((out / REPORT_NAME).read_text())
    assert not report["complete"] and report["counts"]["written"] == 3
    assert [r["status"] for r in report["results"]] == ["written"] * 3 + ["not attempted"] * 3
    for entry in report["results"][3:]:
        assert "rank 1 stopped before finishing its share" in entry["reason"]
    for entry in report["results"]:
        assert all(Path(output).is_file() for output in entry["outputs"])  # whole files only
    assert report["ranks"][1]["status"] == "lost" and report["ranks"][1]["processed"] == 0
    assert not (out / LOCK_NAME).exists() and stale_journals(out) == []
    monkeypatch.undo()
    resumed, _ = _job(2, lambda g: run_batch(darker, PROV, [inputs], out, BatchOptions(
        skip_existing=True, progress=False), 1, group=g))
    written = len(resumed.written)
    assert resumed.ok and written + len(resumed.skipped) == 6 and written in (2, 3)
    single = run_batch(darker, PROV, [inputs], tmp_path / "single", OPTS, batch_size=1)
    assert single.ok
    for i in range(6):
        assert (out / f"{i:02d}.png").read_bytes() == \
            (tmp_path / "single" / f"{i:02d}.png").read_bytes()


# --- the lock admits the ranks of one job and refuses everyone else --------------------------------

def test_the_lock_admits_the_job_and_refuses_a_second_run(tmp_path):
    inputs, out = _images(tmp_path / "in", 2), tmp_path / "out"
    jobs = find_images([inputs], report_all=True)
    held = threading.Event()
    release = threading.Event()

    def rank(group):
        folder = prepare_output([inputs], jobs, out, OPTS, group)
        held.set()
        release.wait(30)
        folder.release()
        return folder.job

    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(_job, 2, rank)
        assert held.wait(30)
        with pytest.raises(ImageError, match="rank 0 of the 2-rank job"):
            run_batch(darker, PROV, [inputs], out, OPTS)  # a plain run
        second = _job(2, lambda g: prepare_output([inputs], jobs, out, OPTS, g))
        release.set()
        ids = job.result()
    assert ids[0] == ids[1] and len(ids[0]) == 32  # both ranks joined the same job
    assert all(isinstance(e, ImageError) and "in use by another" in str(e) for e in second), second
    assert not (out / LOCK_NAME).exists()


def test_a_rank_that_does_not_see_the_locked_folder_stops_the_whole_job(tmp_path):
    inputs = _images(tmp_path / "in", 2)
    jobs = find_images([inputs], report_all=True)

    def rank(group):  # rank 1's "machine" has another folder at that path
        out = tmp_path / ("out" if group.rank == 0 else "elsewhere")
        return prepare_output([inputs], jobs, out, OPTS, group)

    errors = _job(2, rank)
    assert all(isinstance(e, ImageError) and "rank 1: the output folder" in str(e)
               and "shared file system" in str(e) for e in errors)
    assert not (tmp_path / "out" / LOCK_NAME).exists()  # rank 0 let go


def test_an_input_problem_on_rank_0_stops_every_rank(tmp_path):
    errors = _job(2, lambda g: run_batch(darker, PROV, [tmp_path / "missing"], tmp_path / "out",
                                         OPTS, group=g))
    assert all(isinstance(e, ImageError) and "missing" in str(e) for e in errors)


def test_a_full_disk_stops_one_rank_and_the_report_says_so(tmp_path, monkeypatch):
    import errno

    from bsldm_fast.io import images as images_module

    inputs, out = _images(tmp_path / "in", 10), tmp_path / "out"
    real = images_module._save_pil

    def full_at_07(tmp, *args, **kwargs):
        if ".07.png." in Path(tmp).name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tmp, *args, **kwargs)

    monkeypatch.setattr(images_module, "_save_pil", full_at_07)
    first, second = _job(2, lambda g: run_batch(darker, PROV, [inputs], out, OPTS, 1, group=g))
    assert not first.ok and first.lost == [] and not second.job_ok
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["complete"]  # every rank went through its share: this report is the whole job
    assert [r["status"] for r in report["ranks"]] == ["finished", "stopped"]
    status = [r["status"] for r in report["results"]]
    assert status == ["written"] * 7 + ["failed"] + ["not attempted"] * 2
    assert report["results"][9]["reason"] == "run stopped: the output disk is full"
