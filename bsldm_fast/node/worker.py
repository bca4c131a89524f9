"""The batching worker: spool items through one loaded model, results committed to the spool.

One thread owns the model. It takes items from a queue fed by the SCP (and, at start, by what the
spool already holds), gathers up to `batch_size` of them or whatever arrived within `max_wait_ms`
of the first, runs them as one batch, and commits each item's derived instance(s) to outgoing/.
The network side keeps accepting meanwhile: C-STORE handlers only write to the spool.
"""

from __future__ import annotations

import io
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from ..io.dicom import Provenance, derived_dataset
from ..io.formats import ImageError
from ..io.radiograph import Radiograph, bone_unit, read_radiograph
from .spool import ItemState, Spool

logger = logging.getLogger(__name__)

SuppressUnits = Callable[[Sequence[np.ndarray]], list[np.ndarray]]


def encode(ds) -> bytes:
    """A dataset as the bytes of a DICOM file (preamble, file meta)."""
    import pydicom

    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def derived_files(image: Radiograph, soft: np.ndarray, provenance: Provenance,
                  bone: bool) -> dict[str, bytes]:
    """The derived instance(s) of one received image, as file bytes: 'soft.dcm' [, 'bone.dcm']."""
    dicom = image.dicom
    files = {"soft.dcm": encode(derived_dataset(dicom, dicom.to_stored(soft), "soft", provenance))}
    if bone:
        unit = bone_unit(image.unit, soft)
        files["bone.dcm"] = encode(derived_dataset(dicom, dicom.to_stored(unit), "bone",
                                                   provenance))
    return files


class Worker(threading.Thread):
    """Runs spool items through the model in batches (see the module docstring)."""

    def __init__(self, spool: Spool, suppress: SuppressUnits, provenance: Provenance,
                 destinations: Sequence[str], batch_size: int, max_wait_ms: int, bone: bool,
                 on_committed: Callable[[str], None], describe: Callable[[object], str]):
        super().__init__(name="bsldm-node-worker", daemon=True)
        self.spool = spool
        self.suppress = suppress
        self.provenance = provenance
        self.destinations = list(destinations)
        self.batch_size = batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.bone = bone
        self.on_committed = on_committed
        self.describe = describe
        self._queue: queue.Queue[str] = queue.Queue()
        self._queued: set[str] = set()
        self._guard = threading.Lock()
        self._halt = threading.Event()

    def submit(self, name: str) -> None:
        with self._guard:
            if name in self._queued:
                return
            self._queued.add(name)
        self._queue.put(name)

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                first = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            batch = [first]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.batch_size:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    batch.append(self._queue.get(timeout=left))
                except queue.Empty:
                    break
            with self._guard:
                self._queued.difference_update(batch)
            try:
                self._process(batch)
            except Exception:  # never let one batch take the worker down; the items stay spooled
                logger.exception("batch of %d failed unexpectedly; its items stay in the spool",
                                 len(batch))
                time.sleep(1.0)
                for name in batch:
                    if self.spool.incoming_path(name).exists():
                        self.submit(name)

    def _process(self, names: list[str]) -> None:
        images: list[tuple[str, float, Radiograph]] = []
        for name in names:
            path = self.spool.incoming_path(name)
            try:
                received = path.stat().st_mtime
                image = read_radiograph(path)
                if image.dicom is None:
                    raise ImageError(f"{name}: not a DICOM file")
            except FileNotFoundError:
                continue  # already processed (received twice while queued)
            except ImageError as error:
                reason = str(error).replace(str(path), name)
                logger.warning("%s: cannot be processed, moved to failed/: %s", name, reason)
                self.spool.fail(name, f"cannot be processed: {reason}")
                continue
            images.append((name, received, image))
        if not images:
            return
        start = time.perf_counter()
        softs = self._suppress([image.unit for _, _, image in images], [n for n, _, _ in images])
        logger.info("processed a batch of %d in %.2f s", len(images), time.perf_counter() - start)
        for (name, received, image), soft in zip(images, softs):
            if soft is None:
                continue
            try:
                files = derived_files(image, soft, self.provenance, self.bone)
            except Exception as error:  # noqa: BLE001 - a malformed header must not stop the node
                self.spool.fail(name, f"cannot write the derived instance: {type(error).__name__}: "
                                      f"{error}")
                continue
            state = ItemState(source=str(image.dicom.dataset.get("SOPInstanceUID", name)),
                              received=received, processed=time.time(), files=sorted(files),
                              pending=list(self.destinations))
            self.spool.commit(name, files, state)
            logger.info("%s: processed%s", name, self.describe(image.dicom.dataset))
            self.on_committed(name)

    def _suppress(self, units: list[np.ndarray], names: list[str]) -> list[np.ndarray | None]:
        """The batch at once; if that fails, image by image, so one bad image fails alone."""
        try:
            return self.suppress(units)
        except Exception as error:  # noqa: BLE001
            if len(units) == 1:
                logger.warning("%s: the model failed (%s: %s); moved to failed/", names[0],
                               type(error).__name__, error)
                self.spool.fail(names[0], f"the model failed: {type(error).__name__}: {error}")
                return [None]
            logger.warning("a batch of %d failed (%s); running its images one by one", len(units),
                           error)
        out: list[np.ndarray | None] = []
        for unit, name in zip(units, names):
            out.extend(self._suppress([unit], [name]))
        return out
