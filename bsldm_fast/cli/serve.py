"""`bsldm-fast serve`: run the DICOM node (bsldm_fast.node), or list its spool with --status."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading

from ..diffusion import SAMPLERS
from ..engines.runners import BACKENDS
from ..pipeline import PRECISIONS

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run as a DICOM node: receive radiographs (C-STORE), send back bone-suppressed ones",
        description="A DICOM Storage SCP (C-ECHO, C-STORE of CR, DX and Secondary Capture images). "
        "Each received chest radiograph that passes the filter is written to the spool before the "
        "C-STORE is acknowledged, run through the model in batches, and its derived soft-tissue "
        "instance (same Study, new Series) is sent with C-STORE to every destination; it leaves "
        "the spool only when every destination confirmed it. Settings come from --config (TOML) "
        "and these flags, which override it. See README, 'Running as a DICOM node'.",
    )
    p.add_argument("--config", metavar="TOML", help="node config file (TOML)")
    p.add_argument("--status", action="store_true",
                   help="list what the spool holds (waiting, being sent, failed with the reason) "
                        "and exit")
    p.add_argument("--json", action="store_true", help="with --status: print JSON")
    p.add_argument("--ae-title", help="this node's AE title (default BSLDM_FAST)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default 11112; 0: any free port)")
    p.add_argument("--spool", metavar="DIR", help="spool folder (default ./bsldm_node_spool)")
    p.add_argument("--dest", action="append", metavar="AE@HOST:PORT",
                   help="a destination (repeatable; replaces the config's destinations)")
    p.add_argument("--allow-ae", action="append", metavar="AE",
                   help="a calling AE title allowed to associate (repeatable; default: any)")
    p.add_argument("--allow-host", action="append", metavar="IP",
                   help="a peer address allowed to connect (repeatable; default: any)")
    p.add_argument("--model", help="model directory, 'demo' (default) or random:<config>")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--precision", choices=sorted(PRECISIONS))
    p.add_argument("--sampler", choices=SAMPLERS)
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--backend", choices=BACKENDS)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--batch-size", type=int, help="images per model batch (default 4)")
    p.add_argument("--max-wait-ms", type=int,
                   help="run a smaller batch this long after its first image arrived (default 200)")
    p.add_argument("--bone", action="store_true", default=None,
                   help="also send the bone image as a second derived series")
    p.add_argument("--log-phi", action="store_true", default=None,
                   help="log patient names and IDs too (default: SOP Instance UIDs only)")
    p.add_argument("--max-disk-percent", type=float,
                   help="refuse C-STOREs with 0xA700 above this use of the spool's disk "
                        "(default 90)")
    p.add_argument("--retry-initial-s", type=float)
    p.add_argument("--retry-max-s", type=float)
    p.add_argument("--give-up-after-s", type=float,
                   help="move an undelivered item to failed/ this long after it was processed "
                        "(default 3600)")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    from ..node.config import Destination, NodeConfig, load_config, replace

    config = load_config(args.config) if args.config else NodeConfig()
    return replace(
        config,
        ae_title=args.ae_title, host=args.host, port=args.port, spool=args.spool,
        destinations=tuple(Destination.parse(d) for d in args.dest) if args.dest else None,
        batch_size=args.batch_size, max_wait_ms=args.max_wait_ms, bone=args.bone,
        log_phi=args.log_phi,
        **{"access.allowed_aets": tuple(args.allow_ae) if args.allow_ae else None,
           "access.allowed_hosts": tuple(args.allow_host) if args.allow_host else None,
           "model.path": args.model, "model.device": args.device,
           "model.precision": args.precision, "model.sampler": args.sampler,
           "model.steps": args.steps, "model.seed": args.seed, "model.backend": args.backend,
           "model.threads": args.threads,
           "limits.max_disk_percent": args.max_disk_percent,
           "limits.retry_initial_s": args.retry_initial_s,
           "limits.retry_max_s": args.retry_max_s,
           "limits.give_up_after_s": args.give_up_after_s},
    )


def _print_status(report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=1))
        return
    print(f"spool {report['spool']}")
    print(f"waiting to be processed: {len(report['incoming'])}")
    for name in report["incoming"]:
        print(f"  {name}")
    print(f"processed, being sent: {len(report['outgoing'])}")
    for item in report["outgoing"]:
        error = f"; last error: {item['last_error']}" if item["last_error"] else ""
        print(f"  {item['item']}: pending {', '.join(item['pending'])}, {item['attempts']} "
              f"failed attempt(s){error}")
    print(f"failed: {len(report['failed'])}")
    for item in report["failed"]:
        print(f"  {item['item']}: {item['reason']}")


def run(args: argparse.Namespace) -> int:
    from ..modeldir import ModelDirError
    from ..node import Node, NodeConfigError, status

    try:
        config = config_from_args(args)
    except (NodeConfigError, TypeError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.status:
        _print_status(status(config), args.json)
        return 0
    try:
        import pynetdicom  # noqa: F401
    except ImportError:
        print("error: the DICOM node needs pynetdicom: pip install 'bsldm-fast[node]' (or "
              "pip install pynetdicom)", file=sys.stderr)
        return 2
    if not config.destinations:
        print("error: no destinations: give --dest AE@HOST:PORT or [[destinations]] in the config",
              file=sys.stderr)
        return 2
    logging.getLogger("bsldm_fast.node").setLevel(logging.INFO)
    node = Node(config)
    try:
        node.start()
    except (ModelDirError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        node.stop()
        return 2
    print(f"bsldm-fast serve: {config.ae_title} listening on {config.host}:{node.port}, spool "
          f"{config.spool}, sending to {', '.join(d.key for d in config.destinations)}",
          file=sys.stderr, flush=True)
    done = threading.Event()

    def _stop(signum, frame):
        done.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    while not done.wait(timeout=1.0):
        pass
    print("bsldm-fast serve: stopping (the spool keeps what is not delivered yet)", file=sys.stderr)
    node.stop()
    return 0
