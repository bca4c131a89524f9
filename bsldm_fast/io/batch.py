"""Batch suppression of files and folders: the one place the CLI and `Suppressor.suppress_dir` share.

Guarantees (tested in tests/io/test_batch.py):
- folders are searched recursively and each result keeps its relative path under the output folder;
- an input is never opened for writing, and an output that would land on an input, or an output
  folder equal to or inside an input folder, is refused;
- existing outputs are kept unless `overwrite` (or skipped with `skip_existing`);
- every output is written to a temporary file and renamed, so no half-written file is ever left;
- a file that fails is reported with its reason and skipped, and the run goes on; a full disk stops
  the run (every later file would fail too) and the rest are reported as not attempted;
- a JSON report lists every input with its outcome, every failure with its reason and every warning.
"""

from __future__ import annotations

import errno
import json
import logging
import sys
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
from .images import ImageError, Job, find_images
from .radiograph import Radiograph, bone_unit, read_radiograph, write_radiograph, write_review

logger = logging.getLogger(__name__)

REPORT_NAME = "bsldm_fast_report.json"
SuppressUnits = Callable[[list[np.ndarray]], list[np.ndarray]]
"""Display-space images in [0, 1] -> soft-tissue images in [0, 1] of the same sizes."""

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


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
    reason: str | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class BatchResult:
    """Every input's outcome, the time taken and where the report went."""

    outcomes: list[Outcome]
    output: Path
    elapsed_s: float = 0.0
    processed: int = 0
    report_path: Path | None = None
    interrupted: bool = False

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
    out = out_dir.resolve()
    for item in map(Path, inputs):
        if item.is_dir():
            folder = item.resolve()
            if out == folder or folder in out.parents:
                where = "is" if out == folder else "is inside"
                raise ImageError(f"output folder {out_dir} {where} the input folder {item}; choose "
                                 "an output folder outside the inputs")


@dataclass
class _Task:
    job: Job
    outcome: Outcome
    todo: dict[str, Path]
    image: Radiograph | None = None


def _plan(jobs: list[Job], out_dir: Path, options: BatchOptions) -> list[_Task]:
    sources = {job.source.resolve() for job in jobs}
    claimed: dict[Path, Path] = {}
    tasks = []
    for job in jobs:
        outcome = Outcome(str(job.source), "failed")
        task = _Task(job, outcome, {})
        tasks.append(task)
        paths = output_paths(out_dir, job.relative, options)
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
        existing = [p for p in paths.values() if p.exists()]
        if existing and not (options.overwrite or options.skip_existing):
            outcome.reason = (f"output exists: {existing[0]} (use --skip-existing to keep it or "
                              "--overwrite to replace it)")
            continue
        task.todo = {k: p for k, p in paths.items() if options.overwrite or not p.exists()}
        if not task.todo:
            outcome.status, outcome.outputs = "skipped", [str(p) for p in paths.values()]
        else:
            outcome.status = "pending"
    return tasks


def _read(task: _Task) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            task.image = read_radiograph(task.job.source)
        except ImageError as error:
            task.outcome.status, task.outcome.reason = "failed", str(error)
        except MemoryError:
            task.outcome.status, task.outcome.reason = "failed", f"{task.job.source}: out of memory"
    task.outcome.warnings.extend(str(w.message) for w in caught)


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
                 options: BatchOptions) -> bool:
    """Write one batch's outputs (in the writer thread); False when the output disk is full."""
    for task, soft in zip(chunk, softs):
        try:
            _write(task, soft, provenance, options)
            task.outcome.status = "written"
        except ImageError as error:
            task.outcome.status, task.outcome.reason = "failed", str(error)
        except OSError as error:
            task.outcome.status = "failed"
            task.outcome.reason = f"cannot write output: {error.strerror or error}"
            if error.errno in _DISK_FULL:
                task.outcome.reason += " (output disk full or read-only; run stopped)"
                return False
        except Exception as error:  # noqa: BLE001  one bad file must not end the run
            logger.exception("writing %s failed", task.job.source)
            task.outcome.status = "failed"
            task.outcome.reason = f"cannot write output ({type(error).__name__}: {error})"
        finally:
            task.image = None  # free the pixels as soon as a result is on disk
    return True


def run_batch(suppress: SuppressUnits, provenance: Provenance, inputs: Sequence[str | Path],
              out_dir: str | Path, options: BatchOptions = BatchOptions(),
              batch_size: int = 4) -> BatchResult:
    """Suppress every image among `inputs` (files or folders) into `out_dir`, batch by batch.

    Batches take images in order, whatever their sizes (each is resized to the model's resolution).
    One writer thread writes a batch's outputs while the model runs on the next, so file encoding
    overlaps the model. Raises ImageError only when nothing can start (a missing input, an output
    folder inside an input folder); every per-file problem becomes an outcome in the result and
    the report.
    """
    out_dir = Path(out_dir)
    if not inputs:
        raise ImageError("no inputs given")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    jobs = find_images(list(inputs))
    check_output_folder(inputs, out_dir)
    started = datetime.now(timezone.utc)
    tasks = _plan(jobs, out_dir, options)
    result = BatchResult([t.outcome for t in tasks], out_dir)
    pending = [t for t in tasks if t.outcome.status == "pending"]
    start = time.perf_counter()
    bar = tqdm(total=len(pending), unit="img", desc="suppress", file=sys.stderr,
               disable=not options.progress, dynamic_ncols=True)
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bsldm-write")
    in_flight: list = []  # at most one (chunk, future): bounds the images held in memory
    disk_full = False

    def report_failures(chunk: list[_Task]) -> None:
        for done in chunk:
            if done.outcome.status == "failed":
                bar.write(f"failed: {done.outcome.source}: {done.outcome.reason}", file=sys.stderr)
        bar.update(len(chunk))

    def finish_writes() -> None:
        nonlocal disk_full
        while in_flight:
            chunk, future = in_flight.pop()
            if not future.result():
                disk_full = True
            report_failures(chunk)

    chunk: list[_Task] = []
    try:
        for index, task in enumerate(pending):
            _read(task)
            for message in task.outcome.warnings:
                bar.write(f"warning: {message}", file=sys.stderr)
            if task.outcome.status == "failed":
                bar.write(f"failed: {task.outcome.reason}", file=sys.stderr)
                bar.update(1)
            else:
                chunk.append(task)
            if len(chunk) == batch_size or (index == len(pending) - 1 and chunk):
                softs = _suppress_chunk(chunk, suppress)  # runs while the last batch is written
                finish_writes()
                if disk_full:
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
        raise
    finally:
        try:
            finish_writes()  # a started write always completes: outputs are whole or absent
        finally:
            writer.shutdown(wait=True)
            bar.close()
            for task in tasks:
                if task.outcome.status == "pending":
                    task.outcome.status = "not attempted"
                    task.outcome.reason = ("run interrupted" if result.interrupted
                                           else "run stopped: the output disk is full")
            result.elapsed_s = time.perf_counter() - start
            result.report_path = _write_report(result, provenance, inputs, options, started)
    return result


def _write_report(result: BatchResult, provenance: Provenance, inputs: Sequence[str | Path],
                  options: BatchOptions, started: datetime) -> Path | None:
    path = Path(options.report) if options.report else result.output / REPORT_NAME
    report = {
        "tool": "bsldm_fast",
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": round(result.elapsed_s, 3),
        "images_per_s": round(result.images_per_s, 3),
        "provenance": asdict(provenance),
        "inputs": [str(i) for i in inputs],
        "output": str(result.output),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        "interrupted": result.interrupted,
        "counts": {"total": len(result.outcomes), "written": len(result.written),
                   "skipped": len(result.skipped), "failed": len(result.failed)},
        "failures": [{"source": o.source, "status": o.status, "reason": o.reason}
                     for o in result.failed],
        "warnings": [{"source": o.source, "warning": w} for o in result.outcomes for w in o.warnings],
        "results": [asdict(o) for o in result.outcomes],
    }
    text = json.dumps(report, indent=2)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    except OSError as error:
        print(f"error: cannot write the report {path}: {error}", file=sys.stderr)
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
        warnings.warn(message, stacklevel=2)
    if task.outcome.status == "failed":
        raise ImageError(task.outcome.reason)
    soft = suppress([task.image.unit])[0]
    _write(task, soft, provenance, options)
    task.outcome.status = "written"
    return task.outcome
