"""Load test of the DICOM node (`bsldm-fast serve`) against real peers.

    python benchmarks/dicom_node_load.py [--instances 200] [--senders 4] [--steps 10]
                                         [--batch-size 4] [--max-wait-ms 200] [--threads 1]
                                         [--size 1024]

`--senders` dcmtk storescu processes (one association each) send `--instances` chest radiographs
(`--size` px, 12 bits stored, the bundled SZCH samples, each its own study) at once to a node on the
bundled demo model; the node sends every derived instance to an Orthanc started for the run
(loopback, free ports, temporary storage). A warm-up batch goes first and is not counted.
Measured: images/s (first receive to last delivery, from the spool's journal), latency from
receive to delivery (the node's journal: durably received -> C-STORE success at Orthanc; median,
p95, max), the node's peak RSS (VmHWM) and its RSS sampled as the run goes (flat or growing), the
batch sizes the worker ran; checked: every storescu store succeeded, Orthanc holds exactly one
derived instance per source, and three of them (first, middle, last) match what `bsldm-fast
suppress` writes for the same file in fp32 (within CHECK_BOUND and CHECK_SHARE; otherwise no
rate is reported). Writes benchmarks/results/dicom-node-load-<machine>-<date>.json with
`lscpu`'s model and flags (never replacing an earlier result: -2, -3 ... are added).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "node"))  # the peers the node's tests start, reused

from peers import NodeProcess, Orthanc, make_cxr, missing, node_config, tool, wait_for  # noqa: E402

from timing import lscpu, machine, machine_slug, write_new  # noqa: E402


def _rss_mib(pid: int, field: str = "VmRSS") -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text)[1]) / 1024


def _journal(spool: Path) -> list[dict]:
    path = spool / "journal.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


CHECK_BOUND = 2e-2
"""Largest difference, as a share of the stored range, between what the node delivered and what
`bsldm-fast suppress` (fp32, batch 1) writes for the same file, and CHECK_SHARE: the most pixels
that may differ by more than 1e-3. The batch-composition bounds of the README's Python section for
a model with the quantised decode (the node batches; the reference does not)."""
CHECK_SHARE = 1e-3


def _check_pixels(orthanc: Orthanc, sources: list[Path], work: Path, args) -> dict:
    """The derived instances Orthanc received for `sources` against the fp32 product path run on
    the same files: a rate is only reported for output that matches it."""
    import numpy as np
    import pydicom

    out = work / "reference"
    subprocess.run([sys.executable, "-m", "bsldm_fast.cli", "suppress", *map(str, sources), "-o",
                    str(out), "--model", "demo", "--steps", str(args.steps), "--device", "cpu",
                    "--precision", "fp32", "--batch-size", "1"], check=True, capture_output=True,
                   env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
    worst, share = 0.0, 0.0
    for source in sources:
        expected = pydicom.dcmread(out / source.name)
        hits = [h for h in orthanc.post("/tools/lookup", expected.SOPInstanceUID.encode())
                if h["Type"] == "Instance"]
        if len(hits) != 1:
            return {"passed": False, "why": f"{source.name}: {len(hits)} derived instances"}
        delivered = pydicom.dcmread(io.BytesIO(orthanc.instance_file(hits[0]["ID"])))
        diff = np.abs(delivered.pixel_array.astype(np.int64) - expected.pixel_array.astype(np.int64))
        diff = diff / (2 ** int(expected.BitsStored) - 1)
        worst, share = max(worst, float(diff.max())), max(share, float((diff > 1e-3).mean()))
    return {"passed": worst <= CHECK_BOUND and share <= CHECK_SHARE, "instances": len(sources),
            "max_error": worst, "share_above_1e-3": share, "bound": CHECK_BOUND,
            "share_bound": CHECK_SHARE, "reference": "bsldm-fast suppress, fp32, batch 1, same file"}


def run(args: argparse.Namespace) -> dict:
    reason = missing("storescu", "Orthanc")
    if reason:
        sys.exit(f"dicom_node_load: {reason}")
    cpu = lscpu()
    print(f"CPU: {cpu.get('model', '?')}\nflags: {cpu.get('flags', '?')}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bsldm-node-load-"))
    images = work / "images"
    images.mkdir()
    warmup = [make_cxr(images / f"warmup-{i}.dcm", sample=i % 3, size=args.size)
              for i in range(args.batch_size)]
    files = [make_cxr(images / f"{i:04d}.dcm", sample=i % 3, size=args.size)
             for i in range(args.instances)]
    orthanc = Orthanc(work / "orthanc").start()
    spool = work / "spool"
    node = NodeProcess(work, node_config(spool, [orthanc.destination], steps=args.steps,
                                         batch_size=args.batch_size, max_wait_ms=args.max_wait_ms),
                       env={"OMP_NUM_THREADS": str(args.threads)})
    node.config.write_text(node.config.read_text().replace("threads = 1",
                                                           f"threads = {args.threads}"))
    try:
        node.start()
        pid = node.process.pid
        subprocess.run([tool("storescu"), "-aec", "BSLDM_FAST", "127.0.0.1", str(node.port),
                        *map(str, warmup)], check=True, capture_output=True)
        wait_for(lambda: orthanc.count_instances() == len(warmup), 600, "the warm-up batch")
        rss_start = _rss_mib(pid)
        print(f"warm-up done; node RSS {rss_start:.0f} MiB; sending {args.instances} instances "
              f"over {args.senders} associations", flush=True)

        chunks = [files[i::args.senders] for i in range(args.senders)]
        load_start = os.getloadavg()
        start = time.time()
        senders = [subprocess.Popen([tool("storescu"), "-v", "-aec", "BSLDM_FAST", "127.0.0.1",
                                     str(node.port), *map(str, chunk)],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                   for chunk in chunks]
        samples = []
        expected = len(warmup) + len(files)
        while True:
            delivered = orthanc.count_instances()
            samples.append({"t": round(time.time() - start, 2),
                            "delivered": delivered - len(warmup),
                            "rss_mib": round(_rss_mib(pid), 1)})
            if delivered >= expected and not any((spool / "outgoing").iterdir()):
                break
            if time.time() - start > args.timeout:
                raise SystemExit(f"timed out after {args.timeout} s with {delivered} delivered")
            time.sleep(1.0)
        wall = time.time() - start
        load_end = os.getloadavg()
        outputs = [p.communicate(timeout=60)[0] for p in senders]
        peak = _rss_mib(pid, "VmHWM")
        batches = [int(n) for n in re.findall(r"processed a batch of (\d+)", node.text())]
        time.sleep(2.0)
        final_count = orthanc.count_instances()
        check = _check_pixels(orthanc, [files[0], files[len(files) // 2], files[-1]], work, args)
    finally:
        node.stop()
        orthanc.stop()
        for folder in (images, work / "orthanc"):  # ~2 MB an instance, twice
            shutil.rmtree(folder, ignore_errors=True)

    journal = _journal(spool)
    received_first = {}
    for event in journal:
        if event["event"] == "received":
            received_first.setdefault(event["item"], event["t"])
    ordered = sorted(received_first, key=received_first.get)
    warm_names = set(ordered[: len(warmup)])
    delivered = [e for e in journal if e["event"] == "delivered" and e["item"] not in warm_names]
    names = {e["item"] for e in delivered}
    latencies = [e["delivered"] - e["received"] for e in delivered]
    receives = [received_first[name] for name in names]
    first_receive = min(e["received"] for e in delivered)
    last_delivery = max(e["delivered"] for e in delivered)
    stores_ok = sum(out.count("Received Store Response (Success)") for out in outputs)
    result = {
        "benchmark": "dicom_node_load",
        "settings": {"instances": args.instances, "senders": args.senders, "size_px": args.size,
                     "model": "demo (512 px)", "sampler": "ddpm", "steps": args.steps,
                     "batch_size": args.batch_size, "max_wait_ms": args.max_wait_ms,
                     "torch_threads": args.threads, "destination": "Orthanc (loopback)"},
        "machine": machine(),
        "lscpu": cpu,
        "loadavg_1_5_15min": {"start": [round(x, 2) for x in load_start],
                              "end": [round(x, 2) for x in load_end],
                              "note": "the machine is shared: a load above the core count means "
                                      "other jobs took CPU from the node"},
        "stores_succeeded": stores_ok,
        "senders_exit_codes": [p.returncode for p in senders],
        "delivered_items": len(names),
        "orthanc_instances": final_count - len(warmup),
        "failed": len(list((spool / "failed").iterdir())),
        "images_per_s": round(len(names) / (last_delivery - first_receive), 3),
        "wall_s": round(wall, 1),
        "all_received_within_s": round(max(receives) - min(receives), 1),
        "note": "all instances are sent at once, so latency is mostly the wait behind the burst: "
                "the last one waits for every batch before it",
        "latency_s": {"median": round(statistics.median(latencies), 2),
                      "p95": round(_percentile(latencies, 0.95), 2),
                      "max": round(max(latencies), 2), "min": round(min(latencies), 2)},
        "node_rss_mib": {"after_warmup": round(rss_start, 1), "peak_vmhwm": round(peak, 1),
                         "samples": samples[:: max(1, len(samples) // 40)] + samples[-1:]},
        "batches": {"count": len(batches), "sizes": {str(k): batches.count(k)
                                                     for k in sorted(set(batches))}},
    }
    result["check"] = check
    result["ok"] = (stores_ok == args.instances and len(names) == args.instances
                    and result["orthanc_instances"] == args.instances and result["failed"] == 0
                    and check["passed"])
    if not check["passed"]:  # never a rate for output that does not match the reference
        del result["images_per_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-wait-ms", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    result = run(args)
    summary = {k: result.get(k) for k in ("images_per_s", "latency_s", "delivered_items",
                                          "orthanc_instances", "stores_succeeded", "check", "ok")}
    summary["peak_rss_mib"] = result["node_rss_mib"]["peak_vmhwm"]
    print(json.dumps(summary, indent=1))
    info = result["machine"]
    path = write_new(args.out, f"dicom-node-load-{machine_slug(info)}-{info['date']}", result)
    print(f"wrote {path}")
    if not result["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
