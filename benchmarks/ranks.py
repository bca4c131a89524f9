"""`bsldm-fast suppress` in 1 process and under torchrun in N (issue 18): images/s, and the check
that every rank count writes the same bytes.

    python benchmarks/ranks.py [--procs 1,2] [--images 24] [--device cpu] [--repeats 2]
    python benchmarks/ranks.py --device cuda --procs 1,8 --images 128   # one GPU vs 8 (GPU suite)

Each row runs the real command on the same folder of images (the bundled SZCH samples, copied
under distinct names, 1024 px 8-bit PNG), the bundled demo model, the default sampler (DDPM-10),
batch size 4: `python -m bsldm_fast.cli suppress` for 1 process, `torchrun --standalone
--nproc_per_node N -m bsldm_fast.cli suppress` for N. On the CPU each process gets one thread
(OMP_NUM_THREADS=1); on CUDA each rank takes GPU LOCAL_RANK. Two rates per row, medians over the
repeats (the process counts alternate, so a busy machine slows them alike):
- `images_per_s`: the report's, from the plan to the merged report (rank 0's clock): the
  steady-state rate, without the start-up;
- `wall_images_per_s`: images / wall time of the whole command, start-up (import, rendezvous,
  model load) included: what a user waits for.
Check before any rate is reported: the outputs of every row against the first row's (the split is
on batch boundaries, so each image is in the same batch). On the CPU they must be byte-identical;
on CUDA, where each process may pick other convolution kernels, within one grey level (the
project's promise is 1e-5 of the range before quantisation), and the row says whether they were
identical. A row that fails its check is marked failed and gets no rate. `--backend` (default
torch: eager, no minutes of torch.compile per process) is passed to the command. Writes benchmarks/results/ranks-<machine>-<date>.json with `lscpu`'s model
and flags.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402

from timing import lscpu, machine, machine_slug, write_new  # noqa: E402

from bsldm_fast.io import read_image  # noqa: E402


def make_inputs(folder: Path, count: int) -> list[str]:
    samples = sorted((ROOT / "assets" / "szch_samples" / "cxr").glob("*.png"))
    folder.mkdir(parents=True)
    names = []
    for i in range(count):
        names.append(f"{i:03d}.png")
        shutil.copyfile(samples[i % len(samples)], folder / names[-1])
    return names


def run(procs: int, inputs: Path, out: Path, device: str, batch: int, backend: str) -> dict:
    """One run of the command; its report's rate, its wall time, its exit code."""
    cli = ["-m", "bsldm_fast.cli", "suppress", str(inputs), "-o", str(out), "--model", "demo",
           "--device", device, "--batch-size", str(batch), "--backend", backend]
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(procs)] if procs > 1 else [sys.executable])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    start = time.perf_counter()
    done = subprocess.run(launch + cli, capture_output=True, text=True, env=env, timeout=1800,
                          cwd=ROOT)  # `python -m` puts the working folder first on sys.path
    wall = time.perf_counter() - start
    report = json.loads((out / "bsldm_fast_report.json").read_text()) if done.returncode == 0 else {}
    return {"code": done.returncode, "wall_s": wall, "report": report,
            "stderr_tail": done.stderr[-2000:] if done.returncode else ""}


def compare(a: Path, b: Path, names: list[str]) -> dict:
    """Which outputs differ in bytes, and the largest pixel difference in grey levels."""
    differing = [n for n in names if (a / n).read_bytes() != (b / n).read_bytes()]
    levels = 0
    for name in differing:
        x, y = read_image(a / name), read_image(b / name)
        levels = max(levels, int(np.abs(x.astype(np.int64) - y.astype(np.int64)).max()))
    return {"differing": differing, "max_grey_levels": levels}


def _gpus() -> list[str]:
    import torch

    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--procs", default="1,2", help="process counts, the first the reference")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (rank r on GPU LOCAL_RANK)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--backend", default="torch", help="the command's --backend (default torch)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    procs = [int(p) for p in args.procs.split(",")]
    cpu = lscpu()
    print(f"CPU: {cpu.get('model', '?')}\nflags: {cpu.get('flags', '?')}\nload average: "
          f"{os.getloadavg()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bsldm-ranks-"))
    try:
        names = make_inputs(work / "in", args.images)
        runs: dict[int, list[dict]] = {p: [] for p in procs}
        for repeat in range(args.repeats):
            for p in procs:
                out = work / f"out-{p}-{repeat}"
                runs[p].append(run(p, work / "in", out, args.device, args.batch_size,
                                   args.backend))
                r = runs[p][-1]
                rate = r["report"].get("images_per_s", float("nan"))
                print(f"{p} process(es), repeat {repeat}: exit {r['code']}, {rate:.3f} images/s "
                      f"(report), {args.images / r['wall_s']:.3f} images/s (wall, {r['wall_s']:.1f} s)",
                      flush=True)
        reference = work / f"out-{procs[0]}-0"
        rows = []
        for p in procs:
            failed = [r for r in runs[p] if r["code"] != 0]
            check = ({} if failed else compare(reference, work / f"out-{p}-0", names))
            bound = 0 if args.device == "cpu" else 1
            passed = not failed and check["max_grey_levels"] <= bound and (
                bound or not check["differing"])
            row = {"processes": p, "device": args.device, "backend": args.backend,
                   "batch_size": args.batch_size, "images": args.images,
                   "threads_per_process": 1 if args.device == "cpu" else None,
                   "check": {"against": f"{procs[0]} process(es)", **check,
                             "bound_grey_levels": bound, "passed": passed}}
            if not passed:
                row["failed"] = (failed[0]["stderr_tail"] if failed
                                 else f"outputs differ: {check}")
            else:
                row["images_per_s"] = statistics.median(r["report"]["images_per_s"] for r in runs[p])
                row["wall_images_per_s"] = statistics.median(args.images / r["wall_s"]
                                                             for r in runs[p])
                row["repeats"] = [{"images_per_s": r["report"]["images_per_s"],
                                   "wall_s": round(r["wall_s"], 2),
                                   "ranks": r["report"].get("ranks")} for r in runs[p]]
            rows.append(row)
        base = rows[0].get("images_per_s")
        for row in rows:
            if base and "images_per_s" in row:
                row["speedup"] = row["images_per_s"] / base
            print(f"{row['processes']} process(es): "
                  + (f"{row['images_per_s']:.3f} images/s, {row['wall_images_per_s']:.3f} with "
                     f"start-up, x{row.get('speedup', float('nan')):.2f}; outputs "
                     + ("identical" if not row["check"]["differing"] else
                        f"within {row['check']['max_grey_levels']} grey level(s)")
                     if "images_per_s" in row else f"FAILED: {row['failed']}"), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info = machine("cuda" if args.device.startswith("cuda") else "cpu")
    record = {"machine": info, "lscpu": cpu, "load_average_end": os.getloadavg(),
              "gpus": _gpus() if args.device.startswith("cuda") else None,
              "model": "demo", "sampler": "ddpm", "steps": 10, "rows": rows}
    tag = "" if args.device == "cpu" else f"-{args.device}"
    path = write_new(Path(args.out_dir), f"ranks-{machine_slug(info)}{tag}-{time.strftime('%Y-%m-%d')}",
                     record)
    print(f"wrote {path}", file=sys.stderr)
    return 0 if all("images_per_s" in row for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
