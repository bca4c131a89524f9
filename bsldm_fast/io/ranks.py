"""One batch run shared by the ranks of a job (`torchrun ... bsldm_fast.cli suppress`): the split,
the per-rank journals and what rank 0 reads back from them. Torch-free: the messages between ranks
go through a `Group` (bsldm_fast/distributed.py wraps torch.distributed; `SOLO` is one process).

How a job runs (tested in tests/io/test_ranks.py and tests/distributed/):
- rank 0 lists the inputs, checks, probes and locks the output folder (its lock names the job, so
  the other ranks join it and a second job is refused), plans every input and splits the pending
  ones; the others receive their share and never list or plan anything themselves, so the split is
  the same on every rank whatever the file system shows them;
- the split is contiguous and on batch boundaries (`split`), balanced by count to within one batch:
  every image is resized to the model's resolution, so an image costs the same whatever its file
  size. With the same batch size each image is in the same batch as in a one-process run, so the
  outputs are bit-identical (and within the batch-composition bound otherwise: README, Python);
- each rank appends one line to its journal (`OUTDIR/.bsldm_fast.rankN.jsonl`) for every input it
  finishes, after the output was renamed into place, and a last line when it stops. Rank 0 merges
  the journals into the one report: an input a rank did not journal is "not attempted", never
  written, whether the rank was killed, failed or interrupted.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

JOURNAL_PREFIX = ".bsldm_fast.rank"
JOURNAL_SUFFIX = ".jsonl"

MERGE_GRACE_S = 15.0
"""How long rank 0 waits for an interrupted job's other ranks to finish their journals: well
inside torchrun's 30 s between SIGTERM and SIGKILL."""


class Group(Protocol):
    """The messages the ranks of a job exchange (all of them collective: every rank calls each)."""

    rank: int
    world: int

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""

    def scatter(self, objs: Sequence[Any] | None) -> Any:
        """Rank 0's `objs[r]` on rank r (`objs` is read on rank 0 only)."""

    def barrier(self) -> None:
        """Wait for every rank; raises when a rank is gone."""


class Solo:
    """A job of one process: what a plain run (no torchrun) uses."""

    rank, world = 0, 1

    def all_gather(self, obj: Any) -> list[Any]:
        return [obj]

    def scatter(self, objs: Sequence[Any] | None) -> Any:
        return objs[0]

    def barrier(self) -> None:
        pass


SOLO = Solo()


def broadcast(group: Group, make: Callable[[], Any], errors: tuple[type[Exception], ...] = ()) -> Any:
    """Rank 0's `make()` on every rank. One of `errors` raised by it on rank 0 is raised again on
    every rank (as the same type, with the same message), so all ranks stop together."""
    if group.world == 1:
        return make()
    box = None
    if group.rank == 0:
        try:
            box = ("ok", make())
        except errors as error:
            box = ("error", (type(error), str(error)))
    box = group.all_gather(box)[0]
    if box[0] == "error":
        kind, message = box[1]
        raise kind(message)
    return box[1]


def agree(group: Group, error: str | None) -> str | None:
    """The first rank's error (prefixed with its rank), or None when no rank had one: every rank
    learns whether all of them can go on."""
    if group.world == 1:
        return error
    errors = group.all_gather(error)
    return next((f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None), None)


def split(count: int, world: int, batch_size: int) -> list[range]:
    """Contiguous shares of `count` items for `world` ranks, cut on multiples of `batch_size` so
    that every batch is the one a single process would run; rank r gets batches
    [r*B/world, (r+1)*B/world) of the B batches, so shares differ by at most one batch."""
    if world < 1 or batch_size < 1:
        raise ValueError("world and batch_size must be at least 1")
    batches = -(-count // batch_size)
    bounds = [min(count, (r * batches // world) * batch_size) for r in range(world + 1)]
    return [range(bounds[r], bounds[r + 1]) for r in range(world)]


def journal_path(out_dir: Path, rank: int) -> Path:
    return Path(out_dir) / f"{JOURNAL_PREFIX}{rank}{JOURNAL_SUFFIX}"


def stale_journals(out_dir: Path) -> list[Path]:
    """Journals left in `out_dir` by a job that did not finish (rank 0 removes them after a merge)."""
    try:
        names = os.listdir(out_dir)
    except OSError:
        return []
    return sorted(Path(out_dir) / n for n in names
                  if n.startswith(JOURNAL_PREFIX) and n.endswith(JOURNAL_SUFFIX))


class Journal:
    """One rank's record of the inputs it finished: a JSON line each, appended and flushed once the
    outcome is final (outputs already renamed into place), so a rank killed at any instant leaves a
    journal that lists only what it really did. The last line says how the rank stopped."""

    def __init__(self, path: Path, job: str, rank: int):
        self.path = Path(path)
        self._file = open(self.path, "w", encoding="utf-8")
        self._line({"job": job, "rank": rank, "host": socket.gethostname(), "pid": os.getpid()})

    def _line(self, entry: dict) -> None:
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()

    def record(self, index: int, outcome) -> None:
        """Input `index` of the plan is finished: written, failed or not attempted."""
        self._line({"index": index, "outcome": asdict(outcome)})

    def end(self, processed: int, elapsed_s: float, interrupted: bool, stopped: str | None) -> None:
        self._line({"end": {"processed": processed, "elapsed_s": round(elapsed_s, 3),
                            "interrupted": interrupted, "stopped": stopped}})
        os.fsync(self._file.fileno())  # a shared file system shows it to rank 0 once closed
        self.close()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def read_journal(path: Path, job: str) -> tuple[dict | None, dict[int, dict], dict | None]:
    """(header, {plan index: outcome fields}, end) of one rank's journal for `job`; a journal of
    another job, or none, reads as (None, {}, None). A torn line (the rank was killed while
    writing it) is ignored."""
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None, {}, None
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    if not entries or entries[0].get("job") != job:
        return None, {}, None
    done = {e["index"]: e["outcome"] for e in entries[1:] if "index" in e}
    end = next((e["end"] for e in entries[1:] if "end" in e), None)
    return entries[0], done, end


def _alive(header: dict | None) -> bool:
    """Whether a journal's rank may still be running: always True for a rank on another host."""
    if header is None:
        return True
    if header.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(header["pid"]), 0)
    except ProcessLookupError:
        return False
    except (OSError, ValueError, KeyError):
        return True
    return True


def wait_for_journals(out_dir: Path, job: str, ranks: Sequence[int], grace_s: float,
                      sleep: Callable[[float], None] = time.sleep) -> dict[int, tuple]:
    """Each rank's journal, waiting up to `grace_s` for the ranks that have not ended theirs; a rank
    on this host whose process is gone is not waited for."""
    deadline = time.monotonic() + grace_s
    while True:
        journals = {r: read_journal(journal_path(out_dir, r), job) for r in ranks}
        waiting = [r for r, (head, _, end) in journals.items() if end is None and _alive(head)]
        if not waiting or time.monotonic() >= deadline:
            return journals
        sleep(0.1)
