"""The DICOM node: a Storage SCP (C-ECHO, C-STORE) in front of the spool, the worker and the sender.

A C-STORE is answered only after its instance is durably in the spool (or deliberately left alone
by the filter); the model runs in the worker thread, the sending in the sender thread, so the
network side keeps accepting while a batch runs.
"""

from __future__ import annotations

import logging
import socketserver
import ssl
import threading
from pathlib import Path

from .config import NodeConfig
from .filter import STORAGE_CLASSES, skip_reason
from .sender import Sender
from .spool import Spool, item_name
from .worker import Worker

logger = logging.getLogger(__name__)

OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110


def _accepted_syntaxes() -> list[str]:
    """Uncompressed syntaxes, plus every compressed one pydicom can decode here."""
    from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
                             ExplicitVRLittleEndian, ImplicitVRLittleEndian)

    from ..io.dicom import transfer_syntaxes

    syntaxes = [ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
                ExplicitVRBigEndian]
    for row in transfer_syntaxes():
        if row["supported"] and row["uid"] not in syntaxes:
            syntaxes.append(row["uid"])
    return syntaxes


def ssl_contexts(config: NodeConfig) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    """(server, client) TLS contexts from the [tls] section. Without one the SCP is plain TCP, and
    destinations with tls = true are checked against the system's CAs."""
    tls = config.tls
    if tls is None:
        wanted = any(d.tls for d in config.destinations)
        return None, ssl.create_default_context() if wanted else None
    server = None
    if tls.cert:
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=tls.ca or None)
        server.load_cert_chain(tls.cert, tls.key)
        server.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_NONE
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca or None)
    if tls.cert:
        client.load_cert_chain(tls.cert, tls.key)
    return server, client


class Node:
    """`bsldm-fast serve`: `start()`, then `stop()` (or `serve_forever()`).

    `suppressor` defaults to a `Suppressor` built from `config.model`, loaded once; anything with
    its `suppress_unit` and `provenance()` will do. One node per spool: `start` locks it.
    """

    def __init__(self, config: NodeConfig, suppressor=None):
        self.config = config
        self.spool = Spool(config.spool)
        self.suppressor = suppressor
        self.server = None
        self.worker: Worker | None = None
        self.sender: Sender | None = None
        self._stopped = threading.Event()

    # Lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        config = self.config
        self.spool.lock()
        recovered = self.spool.recover()
        logger.info("spool %s: %d waiting to be processed, %d to be sent", self.spool.root,
                    recovered["incoming"], recovered["outgoing"])
        if self.suppressor is None:
            self.suppressor = _load_suppressor(config)
        server_tls, client_tls = ssl_contexts(config)
        self.sender = Sender(self.spool, config.ae_title, config.destinations, config.limits,
                             client_tls)
        self.worker = Worker(self.spool, self.suppressor.suppress_unit,
                             self.suppressor.provenance(), [d.key for d in config.destinations],
                             config.batch_size, config.max_wait_ms, config.bone,
                             on_committed=lambda name: self.sender.notify(),
                             describe=self._describe)
        self.worker.start()
        self.sender.start()
        for name in self.spool.incoming():  # resume what a previous run acknowledged
            self.worker.submit(name)
        self.server = self._start_server(server_tls)
        logger.info("DICOM node %s listening on %s:%d", config.ae_title, config.host, self.port)

    @property
    def port(self) -> int:
        return self.server.server_address[1] if self.server else self.config.port

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
        for thread in (self.worker, self.sender):
            if thread is not None:
                thread.stop()
        for thread in (self.worker, self.sender):
            if thread is not None:
                thread.join(timeout=30)
        self._stopped.set()

    def serve_forever(self) -> None:
        self._stopped.wait()

    # The SCP ---------------------------------------------------------------------------------

    def _start_server(self, tls: ssl.SSLContext | None):
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import Verification
        from pynetdicom.transport import ThreadedAssociationServer

        config = self.config
        ae = AE(ae_title=config.ae_title)
        ae.maximum_pdu_size = config.limits.max_pdu
        ae.maximum_associations = 32
        if config.access.allowed_aets:
            ae.require_calling_aet = list(config.access.allowed_aets)
        ae.add_supported_context(Verification)
        syntaxes = _accepted_syntaxes()
        for sop_class in STORAGE_CLASSES:
            ae.add_supported_context(sop_class, syntaxes)
        allowed_hosts = set(config.access.allowed_hosts)

        class Server(ThreadedAssociationServer):
            def verify_request(self, request, client_address) -> bool:
                if allowed_hosts and client_address[0] not in allowed_hosts:
                    logger.warning("connection from %s refused: not in access.allowed_hosts",
                                   client_address[0])
                    return False
                return True

            def shutdown(self) -> None:
                # NOTE: made by make_server, not start_server, so the AE does not list it; the
                # base class's shutdown would fail removing it from that list.
                socketserver.TCPServer.shutdown(self)
                self.server_close()

        handlers = [(evt.EVT_C_ECHO, lambda event: 0x0000), (evt.EVT_C_STORE, self._on_store),
                    (evt.EVT_REJECTED, self._on_rejected)]
        server = ae.make_server((config.host, config.port), evt_handlers=handlers,
                                ssl_context=tls, server_class=Server)
        thread = threading.Thread(target=server.serve_forever, name="bsldm-node-scp", daemon=True)
        thread.start()
        return server

    def _on_rejected(self, event) -> None:
        logger.warning("association from %s (calling AE %r) rejected",
                       event.assoc.remote["address"], event.assoc.requestor.ae_title)

    def _on_store(self, event) -> int:
        """C-STORE: spool durably, then success; or leave alone (logged); or 0xA700 when full."""
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            sop = str(ds.get("SOPInstanceUID", "")).strip()
        except Exception as error:  # noqa: BLE001 - a malformed dataset is refused, not fatal
            logger.warning("C-STORE refused: cannot decode the dataset (%s)", error)
            return CANNOT_UNDERSTAND
        if not sop:
            logger.warning("C-STORE refused: no SOP Instance UID")
            return CANNOT_UNDERSTAND
        name = item_name(sop)
        reason = skip_reason(ds, self.config.filter)
        if reason:
            logger.info("%s: acknowledged, not processed: %s%s", name, reason, self._describe(ds))
            return 0x0000
        used = self.spool.disk_percent()
        if used > self.config.limits.max_disk_percent:
            logger.warning("%s: refused with 0xA700 (out of resources): the spool's disk is %.1f%% "
                           "full, above limits.max_disk_percent %.1f", name, used,
                           self.config.limits.max_disk_percent)
            return OUT_OF_RESOURCES
        try:
            self.spool.receive(sop, event.encoded_dataset(include_meta=True))
        except OSError as error:
            logger.error("%s: refused with 0xA700: cannot write to the spool (%s)", name, error)
            return OUT_OF_RESOURCES
        logger.info("%s: received from %s%s", name, event.assoc.requestor.ae_title,
                    self._describe(ds))
        self.worker.submit(name)
        return 0x0000

    def _describe(self, ds) -> str:
        """' (patient NAME, ID)' when log_phi is on; else nothing: logs name SOP UIDs only."""
        if not self.config.log_phi:
            return ""
        return f" (patient {ds.get('PatientName', '')}, {ds.get('PatientID', '')})"


def _load_suppressor(config: NodeConfig):
    import torch

    from ..suppressor import Suppressor

    model = config.model
    if model.threads:
        torch.set_num_threads(model.threads)
    suppressor = Suppressor.from_pretrained(model.path, device=model.device, sampler=model.sampler,
                                            steps=model.steps, seed=model.seed,
                                            precision=model.precision,
                                            batch_size=config.batch_size, backend=model.backend)
    logger.info("model %s loaded on %s (%s, %s %d steps)", suppressor.source, suppressor.device,
                suppressor.backend, suppressor.sampler, suppressor.steps)
    return suppressor


def status(config: NodeConfig) -> dict:
    """What the spool holds: `bsldm-fast serve --status`."""
    if not Path(config.spool).is_dir():
        return {"spool": config.spool, "incoming": [], "outgoing": [], "failed": [],
                "note": "no spool folder yet"}
    return Spool(config.spool).status()
