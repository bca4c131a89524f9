"""Issue 20, on the machine where it happens: does the compiled bf16 U-Net return NaN, and is AMX why?

    python benchmarks/diagnose_compiled_bf16.py [--config small] [--freezing]

Runs the `small` U-Net as benchmarks/run.py's torch-compile row does (bf16, channels-last, seeded
input, t = 500) against eager fp32, in three child processes, because oneDNN reads its environment
once, at start:
1. as is;
2. with ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 (oneDNN may not use AMX; everything else equal);
3. as 1 with ONEDNN_VERBOSE=1, keeping the matmul / convolution / brgemm primitives oneDNN chose,
   with their shapes, so the AMX kernels with a K tail (K > 32, K % 32 != 0: oneDNN issue 5717) can
   be named.
NaN in 1 and not in 2 puts the cause in oneDNN's AMX kernels. Prints lscpu, the versions and a
verdict; writes nothing. On machines without AMX, 1 and 2 are the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(config: str, freezing: bool) -> dict:
    """One compiled-vs-eager comparison; what the parent reads from our last stdout line."""
    sys.path.insert(0, str(ROOT))
    import torch

    from bsldm_fast.config import preset
    from bsldm_fast.modeldir import random_model
    from bsldm_fast.pipeline import Pipeline

    model = random_model(preset(config))
    c = model.config
    g = torch.Generator().manual_seed(0)
    u = torch.randn(1, c.unet.in_channels, c.latent_size, c.latent_size, generator=g)
    t = torch.full((1,), 500, dtype=torch.long)
    with torch.inference_mode():
        ref = Pipeline.create(c, model.vqgan, model.unet, "cpu", "fp32").denoiser(u, t)
    with torch.inference_mode():
        eager = Pipeline.create(c, model.vqgan, model.unet, "cpu", "bf16").denoiser(u, t)
    compiled = Pipeline.create(c, model.vqgan, model.unet, "cpu", "bf16", backend="torch-compile",
                               freeze=("unet",) if freezing else ())
    with torch.inference_mode():
        out = compiled.denoiser(u, t)

    def err(x):
        bad = int((~torch.isfinite(x)).sum())
        rel = float((x - ref).abs().max() / ref.abs().max()) if bad == 0 else float("nan")
        return {"not_finite": bad, "of": x.numel(), "rel_max_err": rel}
    return {"eager_bf16": err(eager), "compiled_bf16": err(out)}


def run_child(args, env_extra: dict[str, str]) -> tuple[dict | None, str]:
    env = dict(os.environ, **env_extra)
    cmd = [sys.executable, __file__, "--child", "--config", args.config] + (["--freezing"] if args.freezing else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1]), proc.stdout + proc.stderr
    except (IndexError, json.JSONDecodeError):
        return None, proc.stdout + proc.stderr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="small")
    parser.add_argument("--freezing", action="store_true", help="inductor freezing on")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.config, args.freezing)))
        return 0

    import torch
    from timing import lscpu

    cpu = lscpu()
    amx = "amx_bf16" in cpu.get("flags", "")
    onednn = re.search(r"MKL-DNN v([\d.]+)", torch.__config__.show())
    print(f"CPU: {cpu.get('model', '?')}\nflags: {cpu.get('flags', '?')}")
    print(f"torch {torch.__version__}, oneDNN {onednn.group(1) if onednn else '?'}, AMX: {amx}")

    plain, _ = run_child(args, {})
    no_amx, _ = run_child(args, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"})
    print(f"as is:               {plain}")
    print(f"AMX off for oneDNN:  {no_amx}")
    _, verbose = run_child(args, {"ONEDNN_VERBOSE": "1"})
    kernels = sorted({line for line in verbose.splitlines()
                      if line.startswith("onednn_verbose") and ",exec," in line and "amx" in line})
    # K of a matmul is the last number of its source shape ("16x32x33:16x33x64"); a convolution's
    # brgemm reduces over input channels ("ic33").
    tails = [line for line in kernels
             if any(int(k) > 32 and int(k) % 32
                    for k in re.findall(r"x(\d+):", line) + re.findall(r"ic(\d+)", line))]
    print(f"{len(kernels)} distinct AMX primitive calls; with a dimension > 32 not a multiple of 32 "
          f"(candidate K tails): {len(tails)}")
    for line in tails[:40]:
        print("  " + line)

    def nan(r):
        return r is not None and r["compiled_bf16"]["not_finite"] > 0
    if plain is None or no_amx is None:
        verdict = "a child run failed (see above); run it by hand with --child"
    elif not nan(plain):
        verdict = "no NaN here: this machine does not show issue 20"
    elif amx and not nan(no_amx):
        verdict = ("NaN with AMX, none without: the cause is in oneDNN's AMX kernels (see the "
                   "K-tail candidates above; oneDNN issue 5717)")
    else:
        verdict = "NaN without AMX too: the cause is elsewhere (bisect with tests/benchmarks/test_compiled_bf16.py)"
    print("verdict:", verdict)
    return 0


if __name__ == "__main__":
    sys.exit(main())
