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
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import stat
import sys
import tempfile
import time
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
from .images import SUFFIXES, ImageError, Job, describe_path, find_images
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
        return not self.failed and not self.interrupted

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

    def __init__(self, path: Path, report: Path, fd: int):
        self.path, self.report, self._fd = path, report, fd

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


def _lock(folder: Path) -> int:
    import fcntl

    path = folder / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise ImageError(f"output folder {folder} is in use by another bsldm_fast run "
                             f"(process {holder}); wait for it to finish or choose another "
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
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)  # the holder removed this file as we waited for it: lock the new one


def prepare_output(inputs: Sequence[str | Path], jobs: Sequence[Job], out_dir: str | Path,
                   options: BatchOptions = BatchOptions()) -> OutputFolder:
    """Check, create, probe and lock the output folder and check the report path, before any model
    is loaded; ImageError says why a run cannot start."""
    out_dir = Path(out_dir)
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
        fd = _lock(out_dir)
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


def _plan(jobs: list[Job], out_dir: Path, options: BatchOptions) -> list[_Task]:
    sources = {job.source.resolve() for job in jobs if job.problem is None}
    claimed: dict[Path, Path] = {}
    tasks = []
    for job in jobs:
        outcome = Outcome(str(job.source), "failed")
        task = _Task(job, outcome, {})
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
              batch_size: int = 4, prepared: OutputFolder | None = None) -> BatchResult:
    """Suppress every image among `inputs` (files or folders) into `out_dir`, batch by batch.

    Batches take images in order, whatever their sizes (each is resized to the model's resolution).
    One writer thread writes a batch's outputs while the model runs on the next, so file encoding
    overlaps the model. Raises ImageError only when nothing can start (a missing input, an output
    folder inside an input folder or not writable, a report path that is an input, a folder locked
    by another run); every per-file problem becomes an outcome in the result and the report.
    `prepared`: the folder `prepare_output` checked and locked (the CLI does so before loading the
    model); it is released when the run ends. Ctrl-C raises `BatchInterrupted` carrying the result,
    after the started writes have finished and the report is written.
    """
    out_dir = Path(out_dir)
    if not inputs:
        raise ImageError("no inputs given")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    jobs = find_images(list(inputs), report_all=True)
    folder = prepared or prepare_output(inputs, jobs, out_dir, options)
    try:
        return _run_locked(suppress, provenance, inputs, jobs, out_dir, options, batch_size,
                           folder.report)
    finally:
        folder.release()


def _run_locked(suppress: SuppressUnits, provenance: Provenance, inputs: Sequence[str | Path],
                jobs: list[Job], out_dir: Path, options: BatchOptions, batch_size: int,
                report: Path) -> BatchResult:
    started = datetime.now(timezone.utc)
    _mark_stale(report, started)
    tasks = _plan(jobs, out_dir, options)
    result = BatchResult([t.outcome for t in tasks], out_dir)
    result.removed = _remove_leftovers([p for t in tasks for p in t.paths.values()] + [report])
    pending = [t for t in tasks if t.outcome.status == "pending"]
    start = time.perf_counter()
    bar = tqdm(total=len(pending), unit="img", desc="suppress", file=sys.stderr,
               disable=not options.progress, dynamic_ncols=True)
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bsldm-write")
    in_flight: list = []  # at most one (chunk, future): bounds the images held in memory
    stopped: str | None = None  # why the output disk cannot take more

    def say_failed(task: _Task) -> None:
        bar.write(f"failed: {task.outcome.source}: {task.outcome.reason}", file=sys.stderr)

    def report_failures(chunk: list[_Task]) -> None:
        for done in chunk:
            if done.outcome.status == "failed":
                say_failed(done)
        bar.update(len(chunk))

    def finish_writes() -> None:
        nonlocal stopped
        while in_flight:
            chunk, future = in_flight.pop()
            stopped = future.result() or stopped
            report_failures(chunk)

    chunk: list[_Task] = []
    try:
        for index, task in enumerate(pending):
            _read(task)
            for message in task.outcome.warnings:
                bar.write(f"warning: {task.outcome.source}: {message}", file=sys.stderr)
            if task.outcome.status == "failed":
                say_failed(task)
                bar.update(1)
            else:
                chunk.append(task)
            if len(chunk) == batch_size or (index == len(pending) - 1 and chunk):
                softs = _suppress_chunk(chunk, suppress)  # runs while the last batch is written
                finish_writes()
                if stopped:
                    break
                result.processed += len(chunk)
                if softs is None:
                    report_failures(chunk)
                else:
                    in_flight.append((chunk, writer.submit(_write_chunk, chunk, softs,
                                                           provenance, options)))
                chunk = []
        finish_writes()
    except KeyboardInterrupt:
        result.interrupted = True
    finally:
        try:
            finish_writes()  # a started write always completes: outputs are whole or absent
        finally:
            writer.shutdown(wait=True)
            bar.close()
            for task in tasks:
                if task.outcome.status == "pending":
                    task.image = None
                    task.outcome.status = "not attempted"
                    task.outcome.reason = ("run interrupted" if result.interrupted
                                           else f"run stopped: {stopped}")
            result.elapsed_s = time.perf_counter() - start
            result.report_path = _write_report(result, provenance, inputs, options, started,
                                               report)
    if result.interrupted:
        raise BatchInterrupted(result)
    return result


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
                  options: BatchOptions, started: datetime, path: Path) -> Path | None:
    report = {
        "tool": "bsldm_fast",
        "complete": not result.interrupted,
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
