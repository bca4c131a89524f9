"""The node's spool: nothing acknowledged is ever lost.

Layout (one folder, on one file system, so every move is a rename):

    incoming/UID.dcm      received and acknowledged, not processed yet (UID: the source's SOP UID)
    outgoing/UID/         processed: the derived instance(s) and state.json (destinations pending)
    failed/UID/           given up: what was there, plus reason.txt
    tmp/                  partial writes; emptied when the spool is opened
    journal.jsonl         one line per event (received, processed, delivered, failed), UIDs only;
                          rotated to journal.jsonl.1 at start once above 64 MiB

Guarantees:
- `receive` returns only after the file is written, fsync'ed and renamed into incoming/ (and the
  folder fsync'ed), so the C-STORE success that follows it never acknowledges a file a crash could
  lose;
- an item leaves incoming/ only after its outgoing/ folder, complete with state.json, has been
  renamed into place; it leaves outgoing/ only when every destination confirmed it (or to failed/);
- a crash at any point leaves either the incoming file or a complete outgoing folder (or both: the
  outgoing one wins, see `recover`), never a half-written item.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

STATE = "state.json"
REASON = "reason.txt"
JOURNAL_MAX_BYTES = 64 << 20
"""At start, a journal larger than this becomes journal.jsonl.1 (replacing an older one)."""
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def item_name(sop_uid: str) -> str:
    """The spool name of an instance: its UID, or a hash for a UID that is not a valid one."""
    sop_uid = sop_uid.strip()
    if _UID.match(sop_uid) and len(sop_uid) <= 64:
        return sop_uid
    return "x" + hashlib.sha256(sop_uid.encode()).hexdigest()[:40]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@dataclass
class ItemState:
    """An outgoing item's delivery state (state.json)."""

    source: str
    """The source SOP Instance UID."""
    received: float
    processed: float
    files: list[str]
    pending: list[str]
    """Destination keys ('AE@host:port') that have not confirmed every file yet."""
    delivered: dict[str, float] = field(default_factory=dict)
    attempts: int = 0
    last_error: str = ""

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "ItemState":
        return cls(**json.loads(data))


class Spool:
    """The spool folder (see the module docstring). Thread-safe: the SCP's association threads,
    the worker and the sender share one."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.incoming_dir = self.root / "incoming"
        self.outgoing_dir = self.root / "outgoing"
        self.failed_dir = self.root / "failed"
        self.tmp_dir = self.root / "tmp"
        self._lock = threading.Lock()
        for folder in (self.incoming_dir, self.outgoing_dir, self.failed_dir, self.tmp_dir):
            folder.mkdir(parents=True, exist_ok=True)

    def lock(self) -> None:
        """Hold the spool for this process (one node per spool); the kernel releases the lock when
        the process dies, so a restart after kill -9 takes it at once. OSError if held."""
        import fcntl

        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OSError(f"spool {self.root} is in use by another node (pid {holder})") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    # Receiving -------------------------------------------------------------------------------

    def receive(self, sop_uid: str, data: bytes) -> Path:
        """Write a received instance (a DICOM file's bytes) durably into incoming/."""
        name = item_name(sop_uid)
        tmp = self.tmp_dir / f"{name}.{uuid.uuid4().hex[:8]}.part"
        target = self.incoming_dir / f"{name}.dcm"
        try:
            _write_synced(tmp, data)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.incoming_dir)
        self.journal("received", name)
        return target

    def incoming(self) -> list[str]:
        """Names waiting in incoming/, oldest first."""
        entries = []
        for path in self.incoming_dir.glob("*.dcm"):
            try:
                entries.append((path.stat().st_mtime, path.stem))
            except FileNotFoundError:
                continue
        return [name for _, name in sorted(entries)]

    def incoming_path(self, name: str) -> Path:
        return self.incoming_dir / f"{name}.dcm"

    # Processed -------------------------------------------------------------------------------

    def commit(self, name: str, files: dict[str, bytes], state: ItemState) -> None:
        """Move a processed item from incoming/ to outgoing/NAME with its derived files."""
        work = self.tmp_dir / f"{name}.{uuid.uuid4().hex[:8]}.out"
        work.mkdir()
        try:
            for filename, data in files.items():
                _write_synced(work / filename, data)
            _write_synced(work / STATE, state.to_json())
            _fsync_dir(work)
            target = self.outgoing_dir / name
            with self._lock:
                if target.exists():  # the same source received again: its result replaces
                    self._discard(target)
                os.replace(work, target)
                _fsync_dir(self.outgoing_dir)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        self.incoming_path(name).unlink(missing_ok=True)
        _fsync_dir(self.incoming_dir)
        self.journal("processed", name, received=state.received, processed=state.processed)

    def outgoing(self) -> list[str]:
        """Names in outgoing/ (complete items only), oldest first."""
        entries = []
        for path in self.outgoing_dir.iterdir():
            try:
                entries.append((path.stat().st_mtime, path.name))
            except FileNotFoundError:
                continue
        return [name for _, name in sorted(entries) if (self.outgoing_dir / name / STATE).is_file()]

    def state(self, name: str) -> ItemState:
        return ItemState.from_json((self.outgoing_dir / name / STATE).read_bytes())

    def save_state(self, name: str, state: ItemState) -> None:
        folder = self.outgoing_dir / name
        tmp = folder / f".{STATE}.{uuid.uuid4().hex[:8]}.part"
        _write_synced(tmp, state.to_json())
        os.replace(tmp, folder / STATE)
        _fsync_dir(folder)

    def file(self, name: str, filename: str) -> Path:
        return self.outgoing_dir / name / filename

    def done(self, name: str, state: ItemState) -> None:
        """Every destination confirmed: the item leaves the spool."""
        with self._lock:
            self._discard(self.outgoing_dir / name)
        self.journal("delivered", name, received=state.received, processed=state.processed,
                     delivered=max(state.delivered.values(), default=time.time()))

    # Failures --------------------------------------------------------------------------------

    def fail(self, name: str, reason: str) -> Path:
        """Move an item (incoming or outgoing) to failed/NAME with reason.txt."""
        with self._lock:
            target = self.failed_dir / name
            n = 1
            while target.exists():
                n += 1
                target = self.failed_dir / f"{name}.{n}"
            work = self.tmp_dir / f"{name}.{uuid.uuid4().hex[:8]}.failed"
            source_out = self.outgoing_dir / name
            if source_out.is_dir():
                os.replace(source_out, work)
            else:
                work.mkdir()
            source_in = self.incoming_path(name)
            if source_in.exists():
                os.replace(source_in, work / "source.dcm")
            _write_synced(work / REASON, (reason.rstrip() + "\n").encode())
            _fsync_dir(work)
            os.replace(work, target)
            _fsync_dir(self.failed_dir)
        self.journal("failed", name, reason=reason)
        return target

    def failed(self) -> list[tuple[str, str]]:
        """(name, reason) of every failed item."""
        out = []
        for path in sorted(self.failed_dir.iterdir()):
            reason_file = path / REASON
            reason = (reason_file.read_text(errors="replace").strip() if reason_file.exists()
                      else "?")
            out.append((path.name, reason))
        return out

    # Recovery and status ---------------------------------------------------------------------

    def recover(self) -> dict[str, int]:
        """After a start or a crash: empty tmp/, and drop incoming files whose outgoing item is
        already complete (the crash fell between the two renames of `commit`)."""
        removed = 0
        for path in self.tmp_dir.iterdir():
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed += 1
        journal = self.root / "journal.jsonl"
        if journal.exists() and journal.stat().st_size > JOURNAL_MAX_BYTES:
            os.replace(journal, journal.with_suffix(".jsonl.1"))  # keeps one older journal
        duplicates = 0
        for name in self.incoming():
            if (self.outgoing_dir / name / STATE).is_file():
                state = self.state(name)
                path = self.incoming_path(name)
                if path.stat().st_mtime <= state.received:
                    path.unlink()
                    duplicates += 1
        return {"tmp_removed": removed, "duplicates_removed": duplicates,
                "incoming": len(self.incoming()), "outgoing": len(self.outgoing())}

    def status(self) -> dict:
        """What is in the spool: for `bsldm-fast serve --status`."""
        outgoing = []
        for name in self.outgoing():
            try:
                state = self.state(name)
            except (OSError, ValueError):
                continue
            outgoing.append({"item": name, "pending": state.pending, "attempts": state.attempts,
                             "last_error": state.last_error})
        return {
            "spool": str(self.root),
            "incoming": self.incoming(),
            "outgoing": outgoing,
            "failed": [{"item": name, "reason": reason} for name, reason in self.failed()],
        }

    def disk_percent(self) -> float:
        usage = shutil.disk_usage(self.root)
        return 100.0 * (usage.total - usage.free) / usage.total if usage.total else 100.0

    def journal(self, event: str, name: str, **fields) -> None:
        line = json.dumps({"t": time.time(), "event": event, "item": name, **fields})
        with self._lock:
            try:
                with open(self.root / "journal.jsonl", "a", encoding="utf-8") as f:
                    f.write(line + "\n")
            except OSError as error:  # the journal is a record, never a reason to fail an item
                logger.warning("cannot append to the spool journal: %s", error)

    def _discard(self, folder: Path) -> None:
        """Remove a folder so that a crash half-way never leaves a partial item behind."""
        trash = self.tmp_dir / f"{folder.name}.{uuid.uuid4().hex[:8]}.trash"
        os.replace(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)
