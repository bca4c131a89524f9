"""The README's performance section, generated from the latest results of each machine.

    python benchmarks/summary.py [--results DIR] [--include-tagged] [--replace FILE]

Prints markdown: per machine (its newest full run, else its newest quick one; on a GPU the suite of
gpu_suite.sh), end to end at paper size against the original-style loop measured in the same run,
with the date and the machine; then, per machine, the CPU paths of its newest run that measured
them beside the peers (run.py's `ours_vs_peer`): every path per stage, and our fastest beside the
fastest peer. Only checked rows count: a result file with a row that carries no
passing correctness check (checks.py; files from before issue 20) is refused, and the rows a run
recorded as failed are named with their error, never shown as timings. `--replace FILE` rewrites the block between `<!-- perf:begin -->` and
`<!-- perf:end -->` in FILE (atomically) instead of printing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"
NAME = re.compile(r"^(?P<machine>.+?)-(?P<date>\d{4}-\d{2}-\d{2})(?:-(?P<rest>[^.]+))?\.json$")
MODES = ("quick", "smoke")


def _tag(payload: dict, rest: str | None) -> str:
    """The run's --tag: recorded in run.py's payloads; for files without one (gpu_suite.py's,
    older run.py's), the name's suffix less the mode and a de-duplicating counter."""
    if "tag" in payload:
        return payload["tag"] or ""
    return "-".join(p for p in (rest or "").split("-") if p and p not in MODES and not p.isdigit())


def unchecked(payload: dict) -> list[str]:
    """The rows of a result that lack a passing correctness check (why the file is refused)."""
    out = []
    for r in payload.get("rows", []):
        check = r.get("check")
        if not check or not check.get("passed"):
            why = "no correctness check" if not check else f"check failed ({check.get('reason', '')})"
            out.append(f"{r.get('stage')} {r.get('backend')} {r.get('precision')} batch {r.get('batch')}: {why}")
    return out


def latest(results: Path, include_tagged: bool = False, want=lambda payload: True) -> list[dict]:
    """The best result of each machine (run.py's, or gpu_suite.py's on a GPU) among those `want`
    accepts: its newest full run, else its newest shorter one (runs with a --tag, e.g. 'dev', only
    when asked)."""
    best: dict[str, tuple[tuple, dict]] = {}
    for path in sorted(results.glob("*.json")):
        match = NAME.match(path.name)
        if not match:
            continue
        try:
            payload = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        suite = payload.get("suite")
        if "headline" not in payload and not suite:  # neither run.py's nor gpu_suite.py's
            continue
        if suite and payload["machine"].get("device") == "cpu":  # the GPU suite's dry run
            continue
        if _tag(payload, match["rest"]) and not include_tagged:
            continue
        if not want(payload):
            continue
        bad = unchecked(payload)
        if bad:
            print(f"summary.py: refusing {path.name}: {len(bad)} row(s) without a passing correctness check, "
                  f"e.g. {bad[0]}", file=sys.stderr)
            continue
        mode = payload.get("mode") or (suite or {}).get("mode")
        rank = (mode == "full", payload["machine"].get("time_utc", match["date"]))
        key = match["machine"]
        if key not in best or rank > best[key][0]:
            best[key] = (rank, payload)
    return [payload for _, payload in sorted(best.values(), key=lambda x: x[0][1])]


def _fmt_s(seconds: float) -> str:
    if seconds >= 600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.3g} s" if seconds < 10 else f"{seconds:.1f} s"


def machine_section(payload: dict, config: str = "paper") -> str:
    """One machine's markdown: a table of end-to-end rows at `config` and the headline numbers."""
    info = payload["machine"]
    where = info["device"] if info["device"] != "cpu" else f"{info['processor']}, {info['threads']} threads, CPU only"
    rows = [r for r in payload["rows"] if r["stage"] == "end-to-end" and r["config"] == config
            and r["group"] in ("stages", "gpu-suite")]
    orig = next((r for r in rows if r["backend"] == "original-style"), None)
    if not rows:
        return f"**{where}** ({info['date']}): no end-to-end rows at `{config}` size.\n"
    size = rows[0]["resolution"]
    script, mode = "run.py", payload.get("mode", "?")
    if "suite" in payload:
        script, mode = "gpu_suite.sh", payload["suite"]["mode"]
    lines = [f"**{where}**, {info['date']} (`benchmarks/{script}`, {mode} run, torch "
             f"{info['torch']}), `{config}` model at {size}², random weights:", "",
             "| path | precision | sampler, steps | batch | s / image | vs original-style |",
             "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["backend"] != "original-style", r["per_image_s"])):
        ratio = f"{orig['per_image_s'] / r['per_image_s']:.0f}×" if orig else "-"
        if r is orig:
            ratio = "1×"
        lines.append(f"| {r['backend']} | {r['precision']} | {r['sampler']}-{r['steps']} | {r['batch']} | "
                     f"{_fmt_s(r['per_image_s'])} | {ratio} |")
    if orig and "scaled" in orig.get("note", ""):
        lines += ["", f"original-style: {orig['note'].split('; ')[-1]}."]
    head = payload.get("headline", {}).get(config, {})
    if "unet_fraction_of_peak" in head:
        peak = payload["matmul_peak_flops"]
        prec = head["unet_step"].split()[-1]
        lines += ["", f"U-Net step ({head['unet_step']}, batch 1): {_fmt_s(head['unet_step_s'])}, "
                      f"{head['unet_fraction_of_peak']:.0%} of the {prec} matmul rate measured in the same run "
                      f"({peak[prec] / 1e9:.0f} GFLOP/s)."]
        eager = next((r for r in payload["rows"] if r["stage"] == "unet-step" and r["config"] == config
                      and r["group"] == "stages" and r["batch"] == 1 and r["precision"] == prec
                      and r["backend"] == "torch-eager"), None)
        if eager and not head["unet_step"].startswith("torch-eager"):
            lines[-1] += (f" Eager, as the Pipeline runs it: {_fmt_s(eager['median'])}, "
                          f"{eager['fraction_of_peak']:.0%}.")
    failed = [f for f in payload.get("failed", []) if f.get("group", "stages") in ("stages", "gpu-suite")]
    if failed:
        lines += ["", "Not timed, and left out above: their output failed the correctness check against "
                      "the eager float32 reference (`benchmarks/checks.py`), or they raised:"]
        for f in failed:
            lines.append(f"- {f['stage']} {f['backend']} {f['precision']} `{f['config']}` batch {f['batch']}: "
                         f"{_failure(f)}")
    return "\n".join(lines) + "\n"


def has_peers(payload: dict, config: str = "paper") -> bool:
    """Whether a run measured the CPU paths beside the peers at `config` (run.py's `ours_vs_peer`)."""
    return bool(payload.get("headline", {}).get(config, {}).get("ours_vs_peer"))


STAGE_NAMES = {"vq-encode": "VQ encode", "unet-step": "U-Net step", "vq-decode": "VQ decode",
               "end-to-end": "end to end"}


def peers_section(payload: dict, config: str = "paper") -> str:
    """One machine's CPU paths at `config`, batch 1: every checked path of ours and of the peers per
    stage (seconds; failed ones with their error), then our fastest beside the fastest peer."""
    info = payload["machine"]
    rows = [r for r in payload["rows"] if r["config"] == config and r["batch"] == 1 and r["group"] == "stages"
            and r.get("kind") in ("ours", "peer")]
    failed = [f for f in payload.get("failed", []) if f["config"] == config and f["batch"] == 1]
    columns: list[tuple[str, str, str]] = []
    for r in rows + [{**f, "kind": "peer" if f["backend"] in PEERS else "ours"} for f in failed]:
        column = (r["kind"], r["backend"], r["precision"])
        if column not in columns:
            columns.append(column)
    columns.sort(key=lambda c: (c[0] == "peer", c[1] == "cpu-best"))
    peaks = payload["matmul_peak_flops"]
    rates = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in peaks.items())
    lines = [f"**CPU paths, ours beside the peers: {info['processor']}, {info['threads']} threads**, "
             f"{info['date']} (`benchmarks/run.py`, {payload.get('mode', '?')} run, torch {info['torch']}), "
             f"`{config}` model, random weights, batch 1, seconds per call (end to end: DDPM-10, per image); "
             f"GEMM rates measured in the same run (G op/s): {rates}:", "",
             "| stage | " + " | ".join(f"{b} {p}" + (" (peer)" if k == "peer" else "") for k, b, p in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for stage, name in STAGE_NAMES.items():
        cells = []
        for _, backend, precision in columns:
            row = next((r for r in rows if (r["stage"], r["backend"], r["precision"]) == (stage, backend, precision)), None)
            fail = next((f for f in failed if (f["stage"], f["backend"], f["precision"]) == (stage, backend, precision)), None)
            cells.append(_fmt_s(row["per_image_s"]) if row else f"failed: {_failure(fail)}" if fail else "—")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| stage | ours, fastest checked | s | share of its GEMM rate | best peer | s | peer ÷ ours "
                  "| ours in bf16 | peer ÷ ours in bf16 |", "|---|---|---|---|---|---|---|---|---|"]
    for stage, pair in payload["headline"][config]["ours_vs_peer"].items():
        if "ours" not in pair:
            continue
        peer = (f"{pair['peer']} | {_fmt_s(pair['peer_s'])} | {pair['peer_over_ours']:.2f}×"
                if "peer" in pair else "— | — | —")
        # Ours at the peers' reduced precision, without int8: the like-for-like comparison.
        bf16 = [r for r in rows if r["stage"] == stage and r["kind"] == "ours" and r["precision"] == "bf16"]
        fast = min(bf16, key=lambda r: r["per_image_s"]) if bf16 else None
        like = (f"{fast['backend']} {_fmt_s(fast['per_image_s'])} | "
                + (f"{pair['peer_s'] / fast['per_image_s']:.2f}×" if "peer" in pair else "—")) if fast else "— | —"
        lines.append(f"| {STAGE_NAMES.get(stage, stage)} | {pair['ours']} | {_fmt_s(pair['ours_s'])} | "
                     f"{pair['ours_of_peak']:.0%} | {peer} | {like} |")
    notes = sorted({f"`{r['backend']} {r['precision']}`: {r['note'].split('; ')[-1]}" for r in rows
                    if "timing only" in r.get("note", "")})
    if notes:
        lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


PEERS = ("onnxruntime", "openvino-default")


def _failure(f: dict) -> str:
    check = f.get("check") or {}
    value = check.get("value")
    if check.get("nonfinite"):
        return check.get("reason", "non-finite output")
    if isinstance(value, float) and math.isfinite(value):
        op = "above" if check.get("metric") == "rel_max_error" else "below"
        return f"{check['metric']} {value:.3g}, {op} the {check['precision']} bound {check['bound']:g}"
    return f.get("reason", "failed")


def markdown(payloads: list[dict], config: str = "paper", peer_payloads: list[dict] | None = None) -> str:
    if not payloads:
        return "No benchmark results yet: run `python benchmarks/run.py`.\n"
    intro = ("Generated by `python benchmarks/summary.py` from the newest `benchmarks/results/` of each "
             "machine. Every ratio is against the original BS-LDM loop (`original-style`: fp32, DDPM-1000, "
             "scheduler rebuilt every step) measured in the same run.\n")
    return intro + "\n" + "\n".join(machine_section(p, config) for p in payloads) + "".join(
        "\n" + peers_section(p, config) for p in peer_payloads or [])


def replace_block(path: Path, text: str) -> None:
    """Put `text` between the perf markers of `path`, atomically; the rest of the file is kept as is."""
    original = path.read_text()
    start, end = original.find(BEGIN), original.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{path} has no '{BEGIN}' ... '{END}' block")
    updated = original[: start + len(BEGIN)] + "\n" + text.rstrip("\n") + "\n" + original[end:]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(updated)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--include-tagged", action="store_true", help="also files named ...-<date>-<tag>.json")
    parser.add_argument("--config", default="paper")
    parser.add_argument("--replace", type=Path, help="rewrite the perf block of this file instead of printing")
    args = parser.parse_args(argv)
    peers = latest(args.results, args.include_tagged, lambda payload: has_peers(payload, args.config))
    text = markdown(latest(args.results, args.include_tagged), args.config, peers)
    if args.replace:
        replace_block(args.replace, text)
        print(f"updated {args.replace}")
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
