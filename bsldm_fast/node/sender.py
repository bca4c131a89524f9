"""The sender: C-STORE SCU from the spool's outgoing/ to every destination, with retry and backoff.

An item leaves the spool only when every destination has confirmed every one of its files with a
C-STORE success (or warning) status. A destination that is down is retried, backing off from
`retry_initial_s` (doubling) up to `retry_max_s`; an item still undelivered `give_up_after_s`
after it was processed moves to failed/ with the reason. Derived SOP Instance UIDs are a function
of the source UID and the model's settings, so a resend after a crash (the success arrived but the
state was not saved) stores the same instance again: the PACS keeps one, never a duplicate.
"""

from __future__ import annotations

import logging
import os
import signal
import ssl
import threading
import time
from collections.abc import Sequence

from .config import Destination, Limits
from .spool import Spool

logger = logging.getLogger(__name__)

_SUCCESS = {0x0000, 0xB000, 0xB006, 0xB007}  # success, and the Storage warnings (stored)
CRASH_AFTER_SEND = "BSLDM_NODE_TEST_KILL_AFTER_SEND"
"""Fault injection for the tests only: SIGKILL the node after a C-STORE success, before the
spool records it (the window a real crash could hit)."""


def backoff(attempts: int, limits: Limits) -> float:
    """Seconds to wait after the `attempts`-th failure."""
    return min(limits.retry_initial_s * 2.0 ** max(attempts - 1, 0), limits.retry_max_s)


class Sender(threading.Thread):
    """Delivers outgoing items (see the module docstring)."""

    def __init__(self, spool: Spool, calling_ae: str, destinations: Sequence[Destination],
                 limits: Limits, tls: ssl.SSLContext | None = None):
        super().__init__(name="bsldm-node-sender", daemon=True)
        self.spool = spool
        self.calling_ae = calling_ae
        self.destinations = {d.key: d for d in destinations}
        self.limits = limits
        self.tls = tls
        self._wake = threading.Event()
        self._halt = threading.Event()
        self._next_try: dict[str, float] = {}

    def notify(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._halt.set()
        self._wake.set()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                sent = self._pass()
            except Exception:  # never let the sender die; items stay spooled and are retried
                logger.exception("sender pass failed unexpectedly")
                sent = False
            if not sent:
                self._wake.wait(timeout=self._idle())
                self._wake.clear()

    def _idle(self) -> float:
        now = time.monotonic()
        later = [t - now for t in self._next_try.values() if t > now]
        return max(0.05, min(later + [1.0]))

    def _pass(self) -> bool:
        """One round over what is ready; True when something was attempted."""
        now = time.monotonic()
        ready: dict[str, list[str]] = {}
        for name in self.spool.outgoing():
            if self._next_try.get(name, 0.0) > now:
                continue
            try:
                state = self.spool.state(name)
            except (OSError, ValueError) as error:
                self.spool.fail(name, f"unreadable delivery state: {error}")
                continue
            if not state.pending:
                self.spool.done(name, state)
                continue
            for key in state.pending:
                ready.setdefault(key, []).append(name)
        for key, names in ready.items():
            destination = self.destinations.get(key)
            if destination is None:
                for name in names:
                    self._failed(name, key, "destination no longer configured")
                continue
            self._deliver(destination, names)
        return bool(ready)

    def _deliver(self, destination: Destination, names: list[str]) -> None:
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification  # noqa: F401 (registers the UIDs)

        files = {name: [self.spool.file(name, f) for f in self.spool.state(name).files]
                 for name in names}
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        for sop_class, syntaxes in _contexts([p for paths in files.values() for p in paths]):
            ae.add_requested_context(sop_class, syntaxes)
        tls_args = (self.tls, destination.host) if destination.tls and self.tls else None
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                             tls_args=tls_args)
        if not assoc.is_established:
            why = "association rejected" if assoc.is_rejected else "association failed"
            for name in names:
                self._failed(name, destination.key, f"{why} ({destination.key})")
            return
        try:
            for name in names:
                if self._halt.is_set():
                    break
                error = None
                for path in files[name]:
                    error = _store(assoc, path)
                    if error:
                        break
                    if os.environ.get(CRASH_AFTER_SEND):
                        os.kill(os.getpid(), signal.SIGKILL)
                if error:
                    self._failed(name, destination.key, f"{destination.key}: {error}")
                    if not assoc.is_established:
                        for rest in names[names.index(name) + 1:]:
                            self._failed(rest, destination.key, f"{destination.key}: {error}")
                        return
                    continue
                self._delivered(name, destination.key)
        finally:
            if assoc.is_established:
                assoc.release()

    def _delivered(self, name: str, key: str) -> None:
        state = self.spool.state(name)
        state.pending = [k for k in state.pending if k != key]
        state.delivered[key] = time.time()
        self._next_try.pop(name, None)
        if state.pending:
            self.spool.save_state(name, state)
        else:
            self.spool.done(name, state)
            logger.info("%s: delivered to every destination", name)

    def _failed(self, name: str, key: str, error: str) -> None:
        state = self.spool.state(name)
        state.attempts += 1
        state.last_error = error
        if time.time() - state.processed > self.limits.give_up_after_s:
            reason = (f"not delivered to {', '.join(state.pending)} within "
                      f"{self.limits.give_up_after_s:g} s after {state.attempts} attempts; last "
                      f"error: {error}")
            logger.error("%s: %s; moved to failed/", name, reason)
            self.spool.fail(name, reason)
            self._next_try.pop(name, None)
            return
        self.spool.save_state(name, state)
        wait = backoff(state.attempts, self.limits)
        self._next_try[name] = time.monotonic() + wait
        logger.warning("%s: %s; retrying in %.1f s", name, error, wait)


def _contexts(paths: Sequence) -> list[tuple[str, list[str]]]:
    """Presentation contexts for these files: each SOP class with the uncompressed syntaxes, plus
    one with the file's own syntax when that is another (deflated or RLE: lossless)."""
    from pydicom import dcmread
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    plain = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    wanted: dict[tuple[str, tuple[str, ...]], None] = {}
    for path in paths:
        meta = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).file_meta
        sop_class, syntax = str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
        wanted[(sop_class, tuple(plain))] = None
        if syntax not in plain:
            wanted[(sop_class, (syntax,))] = None
    return [(sop_class, list(syntaxes)) for sop_class, syntaxes in wanted]


def _store(assoc, path) -> str | None:
    """C-STORE one file; None on success, else what went wrong."""
    try:
        try:
            status = assoc.send_c_store(path)
        except ValueError:
            # No accepted context for the file's own (lossless compressed) syntax: send it
            # decompressed instead, never recompressed lossily.
            from pydicom import dcmread

            ds = dcmread(path)
            ds.decompress()
            status = assoc.send_c_store(ds)
    except Exception as error:  # noqa: BLE001 - network and encoding errors alike are retried
        return f"{type(error).__name__}: {error}"
    if not status or "Status" not in status:
        return "no response to the C-STORE (connection lost or timed out)"
    code = int(status.Status)
    if code not in _SUCCESS:
        comment = str(status.get("ErrorComment", "")).strip()
        return f"C-STORE status 0x{code:04X}" + (f" ({comment})" if comment else "")
    return None
