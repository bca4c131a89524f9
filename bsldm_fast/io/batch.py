"""Batch suppression of files and folders: the one place the CLI and `Suppressor.suppress_dir` share.

Guarantees (tested in tests/io/test_batch.py and tests/io/test_reliability.py):
- folders are searched recursively and each result keeps its relative path under the output folder;
- only regular files are opened; every entry that looks like an input (image suffix, or a
  suffix-less name that could be DICOM) is in the report: written, skipped or failed with a reason;
- an input is never opened for writing, and an output (the report included) that would land on an
  input, or an output folder or report inside an input folder, is refused;
- the output folder is probed (a file created, written and removed) and locked for the run before
  the model is loaded: a second run into the same folder is refused, never interleaved;
- existing outputs are kept unless `overwrite` (or skipped with `skip_existing`); temporary files a
  killed run of this tool left beside the outputs are removed;
- every output is written to a temporary file and renamed, so no half-written file is ever left;
- a file that fails is reported with its reason and skipped, and the run goes on; a full or
  read-only output disk stops the run (every later file would fail too) and the rest are reported
  as not attempted;
- the previous report is replaced by an "in progress" one before anything is written, so a report
  that says complete describes this run; the JSON lists every input with its outcome, every
  failure with its reason and every warning, and gives each path also as hex bytes.

Under torchrun the ranks of one job share a run (`group`, see io/ranks.py): rank 0 lists, plans,
locks and splits; each rank writes its share with the guarantees above; rank 0 merges the ranks'
journals into the one report, where an input a lost rank did not finish is "not attempted".
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import stat
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .._files import atomic_write
from .dicom import Provenance
from .formats import SUFFIXES, ImageError, describe_path
from .images import Job, find_images
from .ranks import (MERGE_GRACE_S, SOLO, Group, Journal, agree, broadcast, journal_path,
                    read_journal, split, stale_journals, wait_for_journals)
from .radiograph import Radiograph, bone_unit, read_radiograph, write_radiograph, write_review

logger = logging.getLogger(__name__)

REPORT_NAME = "bsldm_fast_report.json"
LOCK_NAME = ".bsldm_fast.lock"
SuppressUnits = Callable[[list[np.ndarray]], list[np.ndarray]]
"""Display-space images in [0, 1] -> soft-tissue images in [0, 1] of the same sizes."""

_STOPS_THE_RUN = {errno.ENOSPC: "the output disk is full", errno.EDQUOT: "the output disk quota "
                  "is exceeded", errno.EROFS: "the output file system is read-only"}


@dataclass(frozen=True)
class BatchOptions:
    """How a batch treats existing outputs and which extra outputs it writes."""

    overwrite: bool = False
    """Replace existing outputs (never inputs)."""
    skip_existing: bool = False
    """Leave inputs whose outputs all exist alone (resuming an interrupted run)."""
    bone: bool = False
    """Also write the bone image (CXR minus soft tissue) as NAME.bone.EXT."""
    side_by_side: bool = False
    """Also write NAME.review.png: CXR | soft tissue [| bone], 8-bit, for a quick look."""
    progress: bool = True
    """Show a progress bar (images/s) on stderr."""
    report: str | Path | None = None
    """Where the JSON report goes (default: OUTDIR/bsldm_fast_report.json)."""

    def __post_init__(self):
        if self.overwrite and self.skip_existing:
            raise ValueError("overwrite and skip_existing exclude each other")


@dataclass
class Outcome:
    """What happened to one input."""

    source: str
    status: str  # written | skipped | failed | not attempted
    outputs: list[str] = field(default_factory=list)
    """Every output of this input on disk after the run: written now or kept from before."""
    reason: str | None = None
    warnings: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    """The outputs that already existed and were left alone (`skip_existing`)."""


@dataclass
class BatchResult:
    """Every input's outcome, the time taken and where the report went."""

    outcomes: list[Outcome]
    output: Path
    elapsed_s: float = 0.0
    processed: int = 0
    report_path: Path | None = None
    interrupted: bool = False
    removed: list[str] = field(default_factory=list)
    """Temporary files of an earlier, killed run that were removed before this one."""
    rank: int = 0
    """This process's rank in a torchrun job (0 in a plain run); only rank 0's result is merged:
    on the others `outcomes` is the rank's own share."""
    world: int = 1
    lost: list[int] = field(default_factory=list)
    """Ranks of the job that did not go through their share: killed, failed or interrupted (a rank
    stopped by a full disk went through it, reporting the rest as not attempted)."""
    job_ok: bool | None = None
    """On every rank of a job: whether the whole job succeeded, as rank 0 merged it (None when
    rank 0 could not say)."""

    @property
    def complete(self) -> bool:
        """Every rank ran to the end (failures included) and nobody interrupted the run."""
        return not self.interrupted and not self.lost

    def _with(self, status: str) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == status]

    @property
    def written(self) -> list[Outcome]:
        return self._with("written")

    @property
    def skipped(self) -> list[Outcome]:
        return self._with("skipped")

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status in ("failed", "not attempted")]

    @property
    def ok(self) -> bool:
        return not self.failed and self.complete

    @property
    def images_per_s(self) -> float:
        return self.processed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary(self) -> str:
        text = (f"wrote {len(self.written)} of {len(self.outcomes)} images to {self.output} "
                f"({len(self.skipped)} skipped, {len(self.failed)} failed) in {self.elapsed_s:.1f} s, "
                f"{self.images_per_s:.2f} images/s")
        if self.report_path is not None:
            text += f"; report: {self.report_path}"
        return text


class BatchInterrupted(KeyboardInterrupt):
    """Ctrl-C during a batch run, after the started writes finished and the report was written;
    `result` says what was done."""

    def __init__(self, result: BatchResult):
        super().__init__("run interrupted")
        self.result = result


def output_paths(out_dir: Path, relative: Path, options: BatchOptions) -> dict[str, Path]:
    """The outputs of one input: 'soft' at its relative path, and the extras beside it."""
    soft = out_dir / relative
    paths = {"soft": soft}
    if options.bone:
        paths["bone"] = soft.with_name(f"{soft.stem}.bone{soft.suffix}" if soft.suffix
                                       else f"{soft.name}.bone")
    if options.side_by_side:
        paths["review"] = soft.with_name(f"{soft.name}.review.png")
    return paths


def check_output_folder(inputs: Sequence[str | Path], out_dir: Path) -> None:
    """Refuse an output folder equal to or inside an input folder: results would mix with the inputs
    and be read as inputs by the next run."""
    out = Path(out_dir).resolve()
    for item in map(Path, inputs):
        if item.is_dir():
            folder = item.resolve()
            if out == folder or folder in out.parents:
                where = "is" if out == folder else "is inside"
                raise ImageError(f"output folder {out_dir} {where} the input folder {item}; choose "
                                 "an output folder outside the inputs")


def _os_reason(error: OSError) -> str:
    """An OSError in words, telling a read-only file system from a full disk."""
    special = {errno.EROFS: "read-only file system", errno.ENOSPC: "no space left on the disk",
               errno.EDQUOT: "disk quota exceeded", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted"}
    return error.strerror or special.get(error.errno, str(error))


def is_report(path: Path) -> bool:
    """Whether `path` is a JSON report this tool wrote (and so may be replaced by a new run)."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_size > 1024**3:
            return False
        with open(path, "rb") as handle:
            head = handle.read(200)
    except OSError:
        return False
    return re.match(rb'\s*\{\s*"tool":\s*"bsldm_fast"', head) is not None


def report_path(out_dir: Path, options: BatchOptions) -> Path:
    return Path(options.report) if options.report else Path(out_dir) / REPORT_NAME


def _probe(folder: Path) -> None:
    """Create, write, flush and remove a file in `folder`: every reason a run could not write its
    outputs shows up here, before the model is loaded."""
    fd, name = tempfile.mkstemp(prefix=".bsldm_fast_probe.", suffix=".part", dir=folder)
    try:
        os.write(fd, b"bsldm_fast probe\n")
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(name)


class OutputFolder:
    """An output folder checked and locked for one run.

    `prepare_output` makes it; it holds an exclusive lock (flock on OUTDIR/.bsldm_fast.lock, which
    the kernel releases if the process dies) until `release`. A second run into the same folder is
    refused at once, naming the process that holds it, rather than waiting: a run that waits could
    wait for hours, and two runs interleaved would each report only its own share.
    """

    def __init__(self, path: Path, report: Path, fd: int | None, group: Group = SOLO,
                 job: str | None = None):
        self.path, self.report, self._fd = path, report, fd
        self.group = group
        """The ranks that share this folder (SOLO for a plain run)."""
        self.job = job
        """The job's id, written in the lock by rank 0 (None in a plain run)."""

    def release(self) -> None:
        if self._fd is None:
            return
        # Unlinking before closing: a run that opened the old file finds, once it gets the lock,
        # that the path no longer names its file, and starts over (see `_lock`).
        try:
            os.unlink(self.path / LOCK_NAME)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "OutputFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _lock(folder: Path, holder: str | None = None) -> int:
    import fcntl

    path = folder / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 256).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise ImageError(f"output folder {folder} is in use by another bsldm_fast run "
                             f"(process {other}); wait for it to finish or choose another "
                             "output folder") from None
        except OSError:
            os.close(fd)
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{holder or os.getpid()}\n".encode())
            return fd
        os.close(fd)  # the holder removed this file as we waited for it: lock the new one


def prepare_output(inputs: Sequence[str | Path], jobs: Sequence[Job], out_dir: str | Path,
                   options: BatchOptions = BatchOptions(), group: Group = SOLO) -> OutputFolder:
    """Check, create, probe and lock the output folder and check the report path, before any model
    is loaded; ImageError says why a run cannot start.

    In a job (`group.world` > 1) this is collective: rank 0 does all of it (with its `jobs`; the
    others' are not read) and writes the job's id into the lock; every other rank then probes the
    folder and checks that it sees that lock, which it would not if the folder were not shared
    between the machines. An error on any rank is raised on every rank.
    """
    out_dir = Path(out_dir)
    if group.world == 1:
        return _prepare(inputs, jobs, out_dir, options)
    folder = None
    job = uuid.uuid4().hex

    def lock() -> str:
        nonlocal folder
        holder = (f"{os.getpid()} on {socket.gethostname()}, rank 0 of the {group.world}-rank "
                  f"job {job}")
        folder = _prepare(inputs, jobs, out_dir, options, holder)
        folder.group, folder.job = group, job
        return job

    job = broadcast(group, lock, (ImageError,))
    error = None
    if group.rank != 0:
        try:
            seen = (out_dir / LOCK_NAME).read_text(encoding="ascii", errors="replace")
        except OSError:
            seen = ""
        if job not in seen:
            error = (f"the output folder {out_dir} on {socket.gethostname()} is not the one rank 0 "
                     "locked: every machine of a job must see the same output folder (a shared "
                     "file system)")
        else:
            try:
                _probe(out_dir)
            except OSError as e:
                error = f"cannot write to the output folder {out_dir}: {_os_reason(e)}"
    error = agree(group, error)
    if error is not None:
        if folder is not None:
            folder.release()
        raise ImageError(error)
    return folder or OutputFolder(out_dir, report_path(out_dir, options), None, group, job)


def _prepare(inputs: Sequence[str | Path], jobs: Sequence[Job], out_dir: Path,
             options: BatchOptions, holder: str | None = None) -> OutputFolder:
    check_output_folder(inputs, out_dir)
    if os.path.lexists(out_dir) and not out_dir.is_dir():
        raise ImageError(f"output folder {out_dir} is {describe_path(out_dir)}, not a folder")
    report = report_path(out_dir, options)
    _check_report_path(report, inputs, jobs, out_dir, options)
    folders = [(out_dir, "output folder")]
    if _resolved(report.parent) != _resolved(out_dir):
        folders.append((report.parent, "report's folder"))
    for folder, what in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            _probe(folder)
        except OSError as error:
            raise ImageError(f"cannot write to the {what} {folder}: {_os_reason(error)}") from error
    try:
        fd = _lock(out_dir, holder)
    except OSError as error:
        raise ImageError(f"cannot lock the output folder {out_dir}: {_os_reason(error)}") from error
    return OutputFolder(out_dir, report, fd)


def _check_report_path(report: Path, inputs: Sequence[str | Path], jobs: Sequence[Job],
                       out_dir: Path, options: BatchOptions) -> None:
    """The report is an output like any other: never an input, never inside an input folder, never
    one of the images' outputs, and an existing file is replaced only when it is an earlier report
    (or with `overwrite`)."""
    target = report.resolve()
    for job in jobs:
        if job.problem is None and job.source.resolve() == target:
            raise ImageError(f"report {report} would overwrite the input {job.source}; choose "
                             "another report path")
    for item in map(Path, inputs):
        if _resolved(item) == target:
            raise ImageError(f"report {report} would overwrite the input {item}")
        if item.is_dir() and item.resolve() in target.parents:
            raise ImageError(f"report {report} is inside the input folder {item}; it would be "
                             "mixed with the inputs. Choose a report path outside the inputs")
    for job in jobs:
        if job.problem is None and target in {p.resolve() for p in
                                              output_paths(out_dir, job.relative, options).values()}:
            raise ImageError(f"report {report} is also the output of {job.source}; choose "
                             "another report path")
    if SUFFIXES.get(report.suffix.lower()) or report.suffix.lower() == ".part":
        raise ImageError(f"report {report}: a JSON report cannot have an image's name (it would "
                         "be taken for an input by the next run); use .json")
    if os.path.lexists(report):
        if not _is_regular_file(report):
            raise ImageError(f"report {report} is {describe_path(report)}; choose another path")
        if not (is_report(report) or options.overwrite):
            raise ImageError(f"report {report} exists and is not a bsldm_fast report; choose "
                             "another path (or --overwrite to replace it)")


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symbolic link loop
        return Path(os.path.abspath(path))


def _is_regular_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


_PART = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.part")  # what _files.atomic_write creates


def _remove_leftovers(paths: Sequence[Path]) -> list[str]:
    """Remove the temporary files (`.NAME.XXXXXXXX.part`) that a killed run of this tool left
    beside `paths`. Safe because the output folder is locked: no other run is writing them."""
    wanted: dict[Path, set[str]] = {}
    for path in paths:
        wanted.setdefault(path.parent, set()).add(path.name)
    removed = []
    for folder, names in wanted.items():
        try:
            entries = os.listdir(folder)
        except OSError:
            continue
        for entry in entries:
            match = _PART.fullmatch(entry)
            if match and match["name"] in names and _is_regular_file(folder / entry):
                try:
                    os.unlink(folder / entry)
                    removed.append(str(folder / entry))
                except OSError as error:
                    logger.warning("cannot remove %s: %s", folder / entry, _os_reason(error))
    return sorted(removed)


def _strip_path(text: str, source: Path) -> str:
    """A reason without the path in front: every line and report entry names the source once."""
    prefix = f"{source}: "
    return text[len(prefix):] if text.startswith(prefix) else text


@dataclass
class _Task:
    job: Job
    outcome: Outcome
    todo: dict[str, Path]
    image: Radiograph | None = None
    paths: dict[str, Path] = field(default_factory=dict)
    index: int = -1
    """Its place in the plan: how a rank's journal names it."""


def _plan(jobs: list[Job], out_dir: Path, options: BatchOptions) -> list[_Task]:
    sources = {job.source.resolve() for job in jobs if job.problem is None}
    claimed: dict[Path, Path] = {}
    tasks = []
    for index, job in enumerate(jobs):
        outcome = Outcome(str(job.source), "failed")
        task = _Task(job, outcome, {}, index=index)
        tasks.append(task)
        if job.problem is not None:
            outcome.status, outcome.reason = ("failed" if job.fatal else "skipped"), job.problem
            continue
        paths = output_paths(out_dir, job.relative, options)
        task.paths = paths
        resolved = {kind: p.resolve() for kind, p in paths.items()}
        clash = next((p for p in resolved.values() if p in sources), None)
        if clash is not None:
            outcome.reason = f"output {clash} would overwrite an input; choose another output folder"
            continue
        taken = next((p for p in resolved.values() if p in claimed), None)
        if taken is not None:
            outcome.reason = (f"output {taken} is also the output of {claimed[taken]}; give the "
                              "inputs different names or folders")
            continue
        claimed.update({p: job.source for p in resolved.values()})
        existing = [p for p in paths.values() if os.path.lexists(p)]
        if existing and not (options.overwrite or options.skip_existing):
            outcome.reason = (f"output exists: {existing[0]} (use --skip-existing to keep it or "
                              "--overwrite to replace it)")
            continue
        task.todo = {k: p for k, p in paths.items() if options.overwrite or not os.path.lexists(p)}
        outcome.kept = [str(p) for k, p in paths.items() if k not in task.todo]
        outcome.outputs = list(outcome.kept)
        if not task.todo:
            outcome.status = "skipped"
        else:
            outcome.status = "pending"
    return tasks


def _read(task: _Task) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            task.image = read_radiograph(task.job.source)
        except ImageError as error:
            task.outcome.status = "failed"
            task.outcome.reason = _strip_path(str(error), task.job.source)
        except MemoryError:
            task.outcome.status, task.outcome.reason = "failed", "out of memory"
    task.outcome.warnings.extend(_strip_path(str(w.message), task.job.source) for w in caught)


def _write(task: _Task, soft: np.ndarray, provenance: Provenance, options: BatchOptions) -> None:
    image = task.image
    bone = bone_unit(image.unit, soft) if ("bone" in task.todo or "review" in task.todo) else None
    for kind, path in task.todo.items():
        if kind == "review":
            panels = [image.unit, soft] + ([bone] if options.bone else [])
            write_review(path, panels, overwrite=options.overwrite)
        else:
            write_radiograph(path, image, soft if kind == "soft" else bone, kind, provenance,
                             overwrite=options.overwrite)
        task.outcome.outputs.append(str(path))
    order = [str(p) for p in task.paths.values()] or task.outcome.outputs
    task.outcome.outputs.sort(key=lambda p: order.index(p) if p in order else len(order))


def _suppress_chunk(chunk: list[_Task], suppress: SuppressUnits) -> list[np.ndarray] | None:
    """The model's results for one batch; None (and every image failed) when the model fails."""
    try:
        return suppress([t.image.unit for t in chunk])
    except Exception as error:  # noqa: BLE001  one failing batch must not end the run
        logger.exception("suppression failed")
        for task in chunk:
            task.outcome.status = "failed"
            task.outcome.reason = f"suppression failed ({type(error).__name__}: {error})"
            task.image = None
        return None


def _write_chunk(chunk: list[_Task], softs: list[np.ndarray], provenance: Provenance,
                 options: BatchOptions) -> str | None:
    """Write one batch's outputs (in the writer thread); why the run must stop (the output disk is
    full or read-only), else None."""
    for task, soft in zip(chunk, softs):
        try:
            _write(task, soft, provenance, options)
            task.outcome.status = "written"
        except ImageError as error:
            task.outcome.status = "failed"
            task.outcome.reason = _strip_path(str(error), task.job.source)
        except OSError as error:
            task.outcome.status = "failed"
            task.outcome.reason = f"cannot write output: {_os_reason(error)}"
            if error.errno in _STOPS_THE_RUN:
                task.outcome.reason += f" ({_STOPS_THE_RUN[error.errno]}; run stopped)"
                return _STOPS_THE_RUN[error.errno]
        except Exception as error:  # noqa: BLE001  one bad file must not end the run
            logger.exception("writing %s failed", task.job.source)
            task.outcome.status = "failed"
            task.outcome.reason = f"cannot write output ({type(error).__name__}: {error})"
        finally:
            task.image = None  # free the pixels as soon as a result is on disk
    return None


def run_batch(suppress: SuppressUnits, provenance: Provenance, inputs: Sequence[str | Path],
              out_dir: str | Path, options: BatchOptions = BatchOptions(),
              batch_size: int = 4, prepared: OutputFolder | None = None,
              group: Group = SOLO) -> BatchResult:
    """Suppress every image among `inputs` (files or folders) into `out_dir`, batch by batch.

    Batches take images in order, whatever their sizes (each is resized to the model's resolution).
    One writer thread writes a batch's outputs while the model runs on the next, so file encoding
    overlaps the model. Raises ImageError only when nothing can start (a missing input, an output
    folder inside an input folder or not writable, a report path that is an input, a folder locked
    by another run); every per-file problem becomes an outcome in the result and the report.
    `prepared`: the folder `prepare_output` checked and locked (the CLI does so before loading the
    model); it is released when the run ends. Ctrl-C raises `BatchInterrupted` carrying the result,
    after the started writes have finished and the report is written.

    `group`: the ranks of a torchrun job (the prepared folder's, when one is given), which each
    call this with the same arguments; each rank suppresses its share with its own `suppress`,
    and rank 0's result (and report) covers the whole job. SIGINT and SIGTERM (what torchrun sends
    when a rank fails) then stop a rank like Ctrl-C.
    """
    out_dir = Path(out_dir)
    if not inputs:
        raise ImageError("no inputs given")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    group = prepared.group if prepared is not None else group
    jobs = _on_rank0(group, lambda: find_images(list(inputs), report_all=True))
    folder = prepared or prepare_output(inputs, jobs, out_dir, options, group)
    try:
        if group.world == 1:
            return _run_locked(suppress, provenance, inputs, jobs, out_dir, options, batch_size,
                               folder.report)
        return _run_ranks(suppress, provenance, inputs, jobs, out_dir, options, batch_size, folder)
    finally:
        folder.release()


def _on_rank0(group: Group, make: Callable[[], list]) -> list:
    """`make()` on rank 0 only ([] elsewhere); an ImageError it raises is raised on every rank."""
    made: list = []

    def run() -> None:
        made.extend(make())

    broadcast(group, run, (ImageError,))
    return made


@dataclass
class _Progress:
    """How far `_process` got."""

    processed: int = 0
    interrupted: bool = False
    stopped: str | None = None
    """Why the output disk cannot take more, when it cannot."""


def _process(pending: list[_Task], suppress: SuppressUnits, provenance: Provenance,
             options: BatchOptions, batch_size: int, bar: tqdm, state: _Progress,
             finished: Callable[[_Task], None] = lambda task: None) -> None:
    """Read, suppress and write `pending` batch by batch; every task ends written, failed or not
    attempted, and `finished` is called once for each, after its outputs are on disk."""
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bsldm-write")
    in_flight: list = []  # at most one (chunk, future): bounds the images held in memory

    def say_failed(task: _Task) -> None:
        bar.write(f"failed: {task.outcome.source}: {task.outcome.reason}", file=sys.stderr)

    def report_failures(chunk: list[_Task]) -> None:
        for done in chunk:
            if done.outcome.status == "failed":
                say_failed(done)
            finished(done)
        bar.update(len(chunk))

    def finish_writes() -> None:
        while in_flight:
            chunk, future = in_flight.pop()
            state.stopped = future.result() or state.stopped
            report_failures(chunk)

    chunk: list[_Task] = []
    try:
        for index, task in enumerate(pending):
            _read(task)
            for message in task.outcome.warnings:
                bar.write(f"warning: {task.outcome.source}: {message}", file=sys.stderr)
            if task.outcome.status == "failed":
                say_failed(task)
                finished(task)
                bar.update(1)
            else:
                chunk.append(task)
            if len(chunk) == batch_size or (index == len(pending) - 1 and chunk):
                softs = _suppress_chunk(chunk, suppress)  # runs while the last batch is written
                finish_writes()
                if state.stopped:
                    break
                state.processed += len(chunk)
                if softs is None:
                    report_failures(chunk)
                else:
                    in_flight.append((chunk, writer.submit(_write_chunk, chunk, softs,
                                                           provenance, options)))
                chunk = []
        finish_writes()
    except KeyboardInterrupt:
        state.interrupted = True
    finally:
        try:
            finish_writes()  # a started write always completes: outputs are whole or absent
        finally:
            writer.shutdown(wait=True)
            for task in pending:
                if task.outcome.status == "pending":
                    task.image = None
                    task.outcome.status = "not attempted"
                    task.outcome.reason = ("run interrupted" if state.interrupted
                                           else f"run stopped: {state.stopped}" if state.stopped
                                           else "run stopped by an unexpected error")
                    finished(task)


def _begin(jobs: list[Job], out_dir: Path, options: BatchOptions, report: Path
           ) -> tuple[datetime, list[_Task], list[str]]:
    """Mark the old report stale, plan every input and remove what a killed run left."""
    started = datetime.now(timezone.utc)
    _mark_stale(report, started)
    tasks = _plan(jobs, out_dir, options)
    removed = _remove_leftovers([p for t in tasks for p in t.paths.values()] + [report])
    for journal in stale_journals(out_dir):  # a killed job's: no rank of it is running (locked)
        try:
            journal.unlink()
            removed.append(str(journal))
        except OSError as error:
            logger.warning("cannot remove %s: %s", journal, _os_reason(error))
    return started, tasks, removed


def _run_locked(suppress: SuppressUnits, provenance: Provenance, inputs: Sequence[str | Path],
                jobs: list[Job], out_dir: Path, options: BatchOptions, batch_size: int,
                report: Path) -> BatchResult:
    started, tasks, removed = _begin(jobs, out_dir, options, report)
    result = BatchResult([t.outcome for t in tasks], out_dir, removed=removed)
    pending = [t for t in tasks if t.outcome.status == "pending"]
    start = time.perf_counter()
    bar = tqdm(total=len(pending), unit="img", desc="suppress", file=sys.stderr,
               disable=not options.progress, dynamic_ncols=True)
    state = _Progress()
    try:
        _process(pending, suppress, provenance, options, batch_size, bar, state)
    finally:
        bar.close()
        result.processed, result.interrupted = state.processed, state.interrupted
        result.elapsed_s = time.perf_counter() - start
        result.report_path = _write_report(result, provenance, inputs, options, started, report)
    if result.interrupted:
        raise BatchInterrupted(result)
    return result


class _Signals:
    """SIGINT and SIGTERM in a rank of a job. torchrun stops every rank with SIGTERM when one
    fails (and SIGKILLs them 30 s later), and a Ctrl-C reaches each rank and then torchrun's
    SIGTERM too: the first signal raises KeyboardInterrupt while images are processed (`armed`),
    else it is only recorded; later ones are recorded only, so the merge and the report that
    follow are never cut short."""

    def __init__(self):
        self.received: int | None = None
        self.armed = False
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        first = self.received is None
        self.received = self.received or signum
        if first and self.armed:
            raise KeyboardInterrupt

    def __enter__(self) -> "_Signals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _run_ranks(suppress: SuppressUnits, provenance: Provenance, inputs: Sequence[str | Path],
               jobs: list[Job], out_dir: Path, options: BatchOptions, batch_size: int,
               folder: OutputFolder) -> BatchResult:
    group, job, rank0 = folder.group, folder.job, folder.group.rank == 0
    with _Signals() as signals:
        def begin() -> list:
            started, tasks, removed = _begin(jobs, out_dir, options, folder.report)
            pending = [t for t in tasks if t.outcome.status == "pending"]
            shares = [pending[r.start:r.stop] for r in split(len(pending), group.world, batch_size)]
            return [started, tasks, removed, shares]

        plan = _on_rank0(group, begin)  # on rank 0: started, tasks, removed, shares
        mine = group.scatter(plan[3] if rank0 else None)
        if rank0:
            mine = plan[3][0]  # the scattered copy would not be the plan's own tasks
        journal = None if rank0 else Journal(journal_path(out_dir, group.rank), job, group.rank)
        record = (lambda task: journal.record(task.index, task.outcome)) if journal else (
            lambda task: None)
        bar = tqdm(total=len(mine), unit="img", desc=f"suppress (rank 0 of {group.world})",
                   file=sys.stderr, disable=not (options.progress and rank0), dynamic_ncols=True)
        state = _Progress()
        start = time.perf_counter()
        try:
            if signals.received is not None:  # stopped while the job was being planned
                state.interrupted = True
                for task in mine:
                    task.outcome.status, task.outcome.reason = "not attempted", "run interrupted"
                    record(task)
            else:
                signals.armed = True
                try:
                    _process(mine, suppress, provenance, options, batch_size, bar, state, record)
                except KeyboardInterrupt:  # while the last writes were being finished
                    state.interrupted = True
                finally:
                    signals.armed = False
        finally:
            bar.close()
            state.interrupted = state.interrupted or signals.received is not None
            elapsed = time.perf_counter() - start
            if journal is not None:
                journal.end(state.processed, elapsed, state.interrupted, state.stopped)
        together = not state.interrupted
        if together:
            try:
                group.barrier()  # every rank has ended its journal
            except Exception as error:  # noqa: BLE001  a rank is gone: merge what it journaled
                logger.warning("rank %d: a rank of the job is gone (%s)", group.rank, error)
                together = False
        result = BatchResult([t.outcome for t in mine], out_dir, processed=state.processed,
                             elapsed_s=elapsed, interrupted=state.interrupted, rank=group.rank,
                             world=group.world)
        if rank0:
            started, tasks, removed, shares = plan
            others = range(1, group.world)
            journals = ({r: read_journal(journal_path(out_dir, r), job) for r in others}
                        if together else wait_for_journals(out_dir, job, others, MERGE_GRACE_S))
            ranks = [{"rank": 0, "host": socket.gethostname(), "pid": os.getpid(),
                      "status": _rank_status(state.interrupted, state.stopped),
                      "images": len(shares[0]), "processed": state.processed,
                      "elapsed_s": round(elapsed, 3)}]
            for r in others:
                ranks.append(_merge_rank(r, shares[r], journals[r]))
            result = BatchResult([t.outcome for t in tasks], out_dir, removed=removed,
                                 interrupted=state.interrupted, world=group.world,
                                 processed=sum(r["processed"] for r in ranks),
                                 lost=[r["rank"] for r in ranks
                                       if r["status"] in ("lost", "interrupted")])
            result.elapsed_s = time.perf_counter() - start
            result.report_path = _write_report(result, provenance, inputs, options, started,
                                               folder.report, ranks)
            for r in others:
                try:
                    journal_path(out_dir, r).unlink()
                except OSError:
                    pass
        if together:
            try:
                result.job_ok = broadcast(group, lambda: result.ok)
            except Exception as error:  # noqa: BLE001
                logger.warning("rank %d: no word from rank 0 (%s)", group.rank, error)
    if result.interrupted:
        raise BatchInterrupted(result)
    return result


def _rank_status(interrupted: bool, stopped: str | None) -> str:
    return "interrupted" if interrupted else "stopped" if stopped else "finished"


def _merge_rank(rank: int, share: list[_Task], journal: tuple) -> dict:
    """Rank `rank`'s journal into the plan's tasks: an input it did not journal is not attempted,
    its outputs on disk (whole: outputs are renamed into place) listed. What the report says of it."""
    head, done, end = journal
    if end is None:
        status = "lost"
        reason = (f"rank {rank} stopped before finishing its share (killed or failed); run again "
                  "with --skip-existing")
    else:
        status = _rank_status(end["interrupted"], end["stopped"])
        reason = "run interrupted" if end["interrupted"] else f"run stopped: {end['stopped']}"
    for task in share:
        entry = done.get(task.index)
        if entry is not None and entry.get("source") == task.outcome.source:
            for name, value in entry.items():
                setattr(task.outcome, name, value)
        else:
            task.outcome.status, task.outcome.reason = "not attempted", reason
            task.outcome.outputs = [str(p) for p in task.paths.values() if os.path.lexists(p)]
    written = sum(1 for e in done.values() if e.get("status") == "written")
    info = {"rank": rank, "host": head.get("host") if head else None,
            "pid": head.get("pid") if head else None, "status": status, "images": len(share),
            "processed": end["processed"] if end else written}
    if end is not None:
        info["elapsed_s"] = end["elapsed_s"]
    return info


def _mark_stale(report: Path, started: datetime) -> None:
    """Replace the previous run's report by one saying a run is in progress, so that a report left
    behind by a crash or a full disk never passes for this run's; when even that cannot be
    written, remove it."""
    if not os.path.lexists(report):
        return
    marker = {"tool": "bsldm_fast", "complete": False, "started": started.isoformat(),
              "note": "a run started and has not written its report (still running, killed, or "
                      "its report could not be written); outputs on disk are not listed here"}
    try:
        atomic_write(report, lambda tmp: Path(tmp).write_text(json.dumps(marker, indent=2)))
    except OSError:
        try:
            report.unlink()
        except OSError as error:
            raise ImageError(f"cannot replace the previous report {report}: "
                             f"{_os_reason(error)}") from error


def _text(path: str | Path) -> str:
    """A path as valid Unicode for JSON readers (undecodable bytes shown as U+FFFD)."""
    return os.fsencode(path).decode("utf-8", "replace")


def _hex(path: str | Path) -> str:
    """A path's exact bytes, for names that are not UTF-8."""
    return os.fsencode(path).hex()


def _outcome_json(o: Outcome) -> dict:
    return {"source": _text(o.source), "source_hex": _hex(o.source), "status": o.status,
            "outputs": [_text(p) for p in o.outputs], "outputs_hex": [_hex(p) for p in o.outputs],
            "kept": [_text(p) for p in o.kept], "reason": o.reason, "warnings": o.warnings}


def _write_report(result: BatchResult, provenance: Provenance, inputs: Sequence[str | Path],
                  options: BatchOptions, started: datetime, path: Path,
                  ranks: list[dict] | None = None) -> Path | None:
    report = {
        "tool": "bsldm_fast",
        "complete": result.complete,
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": round(result.elapsed_s, 3),
        "images_per_s": round(result.images_per_s, 3),
        "provenance": asdict(provenance),
        "inputs": [_text(i) for i in inputs],
        "inputs_hex": [_hex(i) for i in inputs],
        "output": _text(result.output),
        "output_hex": _hex(result.output),
        "options": {k: (_text(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        "interrupted": result.interrupted,
        "counts": {"total": len(result.outcomes), "written": len(result.written),
                   "skipped": len(result.skipped), "failed": len(result.failed)},
        "removed_temporary_files": [_text(p) for p in result.removed],
        "failures": [{"source": _text(o.source), "source_hex": _hex(o.source), "status": o.status,
                      "reason": o.reason} for o in result.failed],
        "warnings": [{"source": _text(o.source), "source_hex": _hex(o.source), "warning": w}
                     for o in result.outcomes for w in o.warnings],
        "results": [_outcome_json(o) for o in result.outcomes],
    }
    if ranks is not None:  # a torchrun job: what each rank did (a plain run's report is as it was)
        report["world_size"] = result.world
        report["ranks"] = ranks
    text = json.dumps(report, indent=2)
    try:
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    except OSError as error:
        print(f"error: cannot write the report {path}: {_os_reason(error)}", file=sys.stderr)
        return None
    return path


def suppress_file(suppress: SuppressUnits, provenance: Provenance, source: str | Path,
                  target: str | Path, options: BatchOptions = BatchOptions()) -> Outcome:
    """One file, with the batch's guarantees; raises ImageError (or OSError from the disk) on failure.

    Extra outputs (bone, review) go beside `target`.
    """
    source, target = Path(source), Path(target)
    if not source.is_file():
        raise ImageError(f"{source}: no such file")
    task = _plan([Job(source, Path(target.name))], target.parent, options)[0]
    if task.outcome.status == "failed":
        raise ImageError(task.outcome.reason)
    if task.outcome.status == "skipped":
        return task.outcome
    _read(task)
    for message in task.outcome.warnings:
        warnings.warn(f"{source}: {message}", stacklevel=2)
    if task.outcome.status == "failed":
        raise ImageError(f"{source}: {task.outcome.reason}")
    soft = suppress([task.image.unit])[0]
    _write(task, soft, provenance, options)
    task.outcome.status = "written"
    return task.outcome
