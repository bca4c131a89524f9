"""The CPU paths side by side, in one run, each output checked before it is timed (issue 19).

    python benchmarks/cpu_paths.py                  # paper model (random weights), batch 1
    python benchmarks/cpu_paths.py --config small   # a quicker pass

For each stage (VQ encode, one U-Net step, VQ decode) of the model:
- ours, through bsldm_fast's runners (`engines.runners.make_runner`): eager torch fp32 and bf16,
  torch.compile bf16 (inductor, frozen U-Net), OpenVINO fp32 and bf16, and OpenVINO's int8 U-Net
  (NNCF, engines/int8.py; quantised here for the random weights, for timing: its quality gate is
  measured on the bundled model by benchmarks/int8_gate.py);
- peers, what a deployment engineer would run from the same exported ONNX graphs: ONNX Runtime
  fp32 and OpenVINO with its bf16 hint and nothing else;
each checked against eager float32 torch (`engines.tuning.check`: max |err| / max |ref| for the U-Net
and decoder, the share of changed codes for the quantising encoder) before it is timed, with GFLOP/s and the share of the float32 and bf16
GEMM rates measured in the same run. Then end to end (DDPM-10, one image, seed 0): each stage on
our fastest checked runner (the `StageRunner` that `backend="auto"` builds) against the eager fp32
pipeline, PSNR-checked against it. Writes benchmarks/results/cpu-paths-<machine>-<date>.json with
lscpu's model name and flags.
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from checks import check_output  # noqa: E402
from timing import (  # noqa: E402
    lscpu, machine, machine_slug, matmul_peak, measure, unet_flops, vqgan_flops, write_new)

from bsldm_fast.config import preset  # noqa: E402
from bsldm_fast.engines import tuning  # noqa: E402
from bsldm_fast.engines.graphs import graph_module, graph_spec  # noqa: E402
from bsldm_fast.engines.onnx_export import export_graph  # noqa: E402
from bsldm_fast.engines.runners import backend_unavailable, make_runner, make_stage_runner  # noqa: E402
from bsldm_fast.modeldir import random_model  # noqa: E402
from bsldm_fast.pipeline import Pipeline  # noqa: E402

STAGES = tuning.NETWORKS


@dataclass
class Row:
    stage: str
    path: str
    kind: str
    """'ours' (a bsldm_fast runner) or 'peer'."""
    precision: str
    seconds: float | None
    gflops: float | None
    share_fp32_gemm: float | None
    share_bf16_gemm: float | None
    rel_error: float | None
    passed: bool
    note: str = ""


class OnnxRuntimePeer:
    """ONNX Runtime on the CPU, on the fp32 ONNX graphs as exported."""

    name, precision, codes = "onnxruntime", "fp32", None

    def __init__(self, protos: dict):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.sessions = {n: ort.InferenceSession(p.SerializeToString(), options,
                                                 providers=["CPUExecutionProvider"]) for n, p in protos.items()}

    def _run(self, name: str, feeds: dict) -> torch.Tensor:
        out = self.sessions[name].run(None, {k: v.numpy() for k, v in feeds.items()})[0]
        return torch.from_numpy(out)

    def encode(self, images):
        return self._run("encoder", {"image": images})

    def denoise(self, u, t):
        return self._run("unet", {"U": u, "t": t})

    def decode(self, latents):
        return self._run("decoder", {"latent": latents})


class OpenVINOPeer:
    """OpenVINO on the fp32 ONNX graphs with the bf16 inference-precision hint and defaults."""

    name, precision, codes = "openvino-default", "bf16", None

    def __init__(self, protos: dict, batch: int):
        import tempfile

        import onnx
        import openvino as ov

        core = ov.Core()
        self.compiled = {}
        for name, proto in protos.items():
            with tempfile.TemporaryDirectory() as scratch:
                path = Path(scratch) / f"{name}.onnx"
                onnx.save(proto, str(path))
                model = core.read_model(str(path))
            model.reshape({p.get_any_name(): [batch, *list(p.get_partial_shape())[1:]] for p in model.inputs})
            self.compiled[name] = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})

    def _run(self, name: str, *inputs) -> torch.Tensor:
        result = self.compiled[name]([x.numpy() for x in inputs])
        return torch.from_numpy(np.asarray(result[0]))

    def encode(self, images):
        return self._run("encoder", images)

    def denoise(self, u, t):
        return self._run("unet", u, t)

    def decode(self, latents):
        return self._run("decoder", latents)


def _int8_runner(model, scratch: Path):
    """The OpenVINO runner with an int8 U-Net quantised for this (random) model, calibrated on the
    (U, t) of sampling one phantom with it: timing only, since the quality gate needs trained weights
    and held-out real pairs (benchmarks/int8_gate.py measures it on the bundled model)."""
    from bsldm_fast import modeldir
    from bsldm_fast.engines import int8
    from bsldm_fast.engines.openvino import OpenVINORunner

    model_dir = scratch / "model"
    modeldir.save(model_dir, model.config, model.vqgan, model.unet)
    int8.int8_unet_ir(model_dir, model, calibration_images=[], phantoms=(0,), runs=(("ddpm", None, 0),))
    return OpenVINORunner(model.config, model.vqgan, model.unet, "int8", model_dir, gated=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="paper", choices=("tiny", "small", "paper"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    model = random_model(preset(args.config))
    config, batch = model.config, 1
    inputs = tuning.network_inputs(config, batch)
    flops = {"unet": unet_flops(config, batch)}
    flops["encoder"], flops["decoder"] = vqgan_flops(config, batch)
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"GEMM peaks: fp32 {peaks['fp32'] / 1e9:.0f}, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s", flush=True)

    reference = make_runner(config, model.vqgan, model.unet, "cpu", "fp32", "torch")
    with torch.inference_mode():
        expected = {s: tuning.network_call(reference, s)(*inputs[s]) for s in STAGES}

    paths: list[tuple[str, str, str, Callable[[], object]]] = [
        ("torch", "ours", "fp32", lambda: reference),
        ("torch", "ours", "bf16", lambda: make_runner(config, model.vqgan, model.unet, "cpu", "bf16", "torch")),
        ("torch-compile", "ours", "bf16", lambda: make_runner(
            config, copy.deepcopy(model.vqgan), copy.deepcopy(model.unet), "cpu", "bf16", "torch-compile",
            freeze=("unet",))),
    ]
    openvino_missing = backend_unavailable("openvino", torch.device("cpu"))
    for precision in ("fp32", "bf16"):
        paths.append(("openvino", "ours", precision, lambda p=precision: make_runner(
            config, model.vqgan, model.unet, "cpu", p, "openvino")))
    scratch = tempfile.TemporaryDirectory(prefix="bsldm-cpu-paths-")
    if openvino_missing is None:
        paths.append(("openvino", "ours", "int8", lambda: _int8_runner(model, Path(scratch.name))))

    def protos() -> dict:
        return {name: export_graph(graph_module(name, config, model.vqgan, model.unet), graph_spec(name, config))
                for name in STAGES}

    paths.append(("onnxruntime", "peer", "fp32", lambda: OnnxRuntimePeer(protos())))
    paths.append(("openvino-default", "peer", "bf16", lambda: OpenVINOPeer(protos(), batch)))

    rows: list[Row] = []
    for path, kind, precision, build in paths:
        missing = openvino_missing if path == "openvino" else None
        if path == "openvino-default":
            try:
                import openvino  # noqa: F401
            except ImportError as error:
                missing = str(error)
        if missing:
            rows += [Row(s, path, kind, precision, None, None, None, None, None, False, missing) for s in STAGES]
            continue
        # One path in memory at a time: the paper model's runners together outgrow 24 GiB.
        torch._dynamo.reset()
        gc.collect()
        runner = build()
        for stage in ("unet",) if precision == "int8" else STAGES:
            call = tuning.network_call(runner, stage)
            with torch.inference_mode():
                out = call(*inputs[stage])
                passed, value, what = tuning.check(stage, out, expected[stage], precision)
                if not passed:
                    rows.append(Row(stage, path, kind, precision, None, None, None, None, value, False, what))
                    print(f"{stage:8s} {path:17s} {precision}: FAILED {what}", flush=True)
                    continue
                t = measure(lambda: call(*inputs[stage]), warmup=1, repeats=args.repeats)
            rate = flops[stage] / t.median
            rows.append(Row(stage, path, kind, precision, t.median, rate / 1e9, rate / peaks["fp32"],
                            rate / peaks["bf16"], value, True, what))
            print(f"{stage:8s} {path:17s} {precision}: {t.median:8.3f} s  {rate / 1e9:7.1f} GFLOP/s  "
                  f"{what}", flush=True)
        del runner

    # Ours at reduced precision: the fastest checked runner per stage, as backend='auto' picks it.
    best = {}
    for stage in STAGES:
        timed = [r for r in rows if r.stage == stage and r.kind == "ours" and r.passed and r.precision == "bf16"]
        best[stage] = min(timed, key=lambda r: r.seconds).path if timed else "torch"
    staged = make_stage_runner(config, model.vqgan, model.unet, best, "cpu", "bf16")
    image = inputs["encoder"][0]
    plain = Pipeline(config, reference, "cpu")
    fast = Pipeline(config, staged, "cpu")
    with torch.inference_mode():
        want = plain.run(image, [0])
        got = fast.run(image, [0])
    e2e_check = check_output(got, want, "bf16", image=True)
    t_plain = measure(lambda: plain.run(image, [0]), warmup=0, repeats=1)
    t_fast = measure(lambda: fast.run(image, [0]), warmup=0, repeats=2)
    e2e = {"sampler": "ddpm", "steps": 10, "stage_runners": best, "check": e2e_check.as_dict(),
           "eager_fp32_s": t_plain.median, "best_s": t_fast.median if e2e_check.passed else None,
           "speedup": t_plain.median / t_fast.median if e2e_check.passed else None}
    print(f"end to end (DDPM-10, 1 image): eager fp32 {t_plain.median:.2f} s, ours {t_fast.median:.2f} s "
          f"({best}); {e2e_check.summary()}", flush=True)

    info = machine()
    payload = {"machine": info, "lscpu": lscpu(), "config": config.name, "batch": batch,
               "weights": "random (random_model, seed 0)", "gemm_peak_flops": peaks,
               "tolerances": {"rel_max_error": tuning.REL_MAX_ERROR, "max_code_flips": tuning.MAX_CODE_FLIPS},
               "rows": [asdict(r) for r in rows], "end_to_end": e2e}
    path = write_new(args.out, f"cpu-paths-{machine_slug(info)}-{config.name}-{info['date']}", payload)
    print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
