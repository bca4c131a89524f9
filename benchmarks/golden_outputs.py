"""Record, then check, that a refactor left the outputs bit-identical on this machine.

    python benchmarks/golden_outputs.py record  OUT.json   # before the change
    python benchmarks/golden_outputs.py check   OUT.json   # after it: exit 1 on any difference

What it hashes (SHA-256 of the raw float32 / uint16 bytes):
- `bsldm-fast suppress` on the bundled samples with the demo model, every sampler, fp32 and bf16,
  seed 0 (and DDPM with --offset-noise): the decoded output pixels of each file;
- the tensor pipeline on the tiny random model: every sampler, step backend 'reference' and the
  fused default, fp32 and bf16, offset noise on and off;
- the ONNX graphs of the tiny random model exported by `engines.onnx_export`, run by onnxruntime
  on fixed inputs.

bf16 and oneDNN kernels differ between CPUs, so a record is only valid on the machine (and the
torch build) that made it: the file names the CPU and the check refuses another.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from timing import lscpu  # noqa: E402

SAMPLES = ROOT / "assets" / "szch_samples" / "cxr"


def digest(array) -> str:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().contiguous().numpy()
    array = np.ascontiguousarray(array)
    return hashlib.sha256(array.dtype.str.encode() + str(array.shape).encode() + array.tobytes()).hexdigest()


def cli_outputs() -> dict[str, str]:
    from bsldm_fast.io.images import read_image

    hashes = {}
    runs = [(s, p, []) for s in ("ddpm", "ddim", "dpmpp") for p in ("fp32", "bf16")]
    runs.append(("ddpm", "fp32", ["--offset-noise"]))
    for sampler, precision, extra in runs:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "bsldm_fast.cli", "suppress", str(SAMPLES), "-o", tmp,
                   "--sampler", sampler, "--precision", precision, "--seed", "0", "--device", "cpu",
                   *extra]
            subprocess.run(cmd, check=True, capture_output=True)
            for path in sorted(Path(tmp).glob("*.png")):
                key = f"suppress/{sampler}/{precision}{''.join(extra)}/{path.name}"
                hashes[key] = digest(read_image(path))
    return hashes


def pipeline_outputs() -> dict[str, str]:
    from bsldm_fast.modeldir import random_model
    from bsldm_fast.pipeline import Pipeline

    model = random_model("tiny")
    size = model.config.image_size
    images = torch.rand((2, 1, size, size), generator=torch.Generator().manual_seed(1)) * 2 - 1
    hashes = {}
    for precision in ("fp32", "bf16"):
        for backend in ("reference", "auto"):
            pipeline = Pipeline.create(model.config, model.vqgan, model.unet, "cpu", precision, backend)
            for sampler in ("ddpm", "ddim", "dpmpp"):
                for offset in (False, True):
                    out = pipeline.run(images, [3, 11], sampler, steps=6, offset_noise=offset)
                    hashes[f"pipeline/{precision}/{backend}/{sampler}/offset={offset}"] = digest(out)
    return hashes


def onnx_outputs() -> dict[str, str]:
    from bsldm_fast.engines.graphs import GRAPH_NAMES, graph_module, graph_spec
    from bsldm_fast.engines.onnx_export import export_graph, onnxruntime_outputs
    from bsldm_fast.modeldir import random_model

    model = random_model("tiny")
    hashes = {}
    for name in GRAPH_NAMES:
        spec = graph_spec(name, model.config)
        module = graph_module(name, model.config, model.vqgan, model.unet)
        proto = export_graph(module, spec)
        feeds = spec.sample_inputs(2, torch.Generator().manual_seed(2),
                                   model.config.diffusion.num_train_timesteps)
        hashes[f"onnx/{name}"] = digest(onnxruntime_outputs(proto, feeds))
    return hashes


def machine() -> dict[str, str]:
    cpu = lscpu()
    return {"cpu": cpu.get("model", "?"), "torch": torch.__version__}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("record", "check"))
    parser.add_argument("path", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    hashes = {**pipeline_outputs(), **onnx_outputs(), **cli_outputs()}
    if args.mode == "record":
        if args.path.exists():
            raise SystemExit(f"{args.path} exists; refusing to overwrite a record")
        args.path.write_text(json.dumps({"machine": machine(), "hashes": hashes}, indent=1) + "\n")
        print(f"recorded {len(hashes)} outputs in {args.path}")
        return 0
    record = json.loads(args.path.read_text())
    if record["machine"] != machine():
        raise SystemExit(f"recorded on {record['machine']}, this is {machine()}: not comparable")
    differ = sorted(k for k in record["hashes"] if hashes.get(k) != record["hashes"][k])
    missing = sorted(set(hashes) ^ set(record["hashes"]))
    for key in differ:
        print(f"DIFFERS {key}")
    for key in missing:
        print(f"ONLY IN ONE {key}")
    print(f"{len(record['hashes']) - len(differ)}/{len(record['hashes'])} bit-identical")
    return 1 if differ or missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
