"""Where the OpenVINO U-Net step spends its time, per layer type, in bf16 and int8.

    python benchmarks/openvino_unet_profile.py [--config paper] [--rounds 9] [--model-dir DIR]

Three compiled U-Nets of one model, timed alternately (one call each per round, so a busy VM slows
all three alike) with OpenVINO's per-layer counters (PERF_COUNT) on:
- `bf16 exporter chain`: the fp32 ONNX graph with the bf16 hint, GroupNorms as the exporter wrote them;
- `bf16` (ours): the same with GroupNorms as per-channel statistics (engines/openvino_group_norm.py),
  as the OpenVINO runner compiles it;
- `int8` (ours): the model's NNCF int8 IR as the runner compiles it (as gated: no rewrite).
Each one's first output is checked against the float32 PyTorch U-Net on the same real-looking input
(a chest phantom's latent noised at t = 500) with checks.py's bounds before anything is timed.

Without --model-dir the model is `--config` with random weights, saved in a temporary folder, its
int8 IR calibrated on one phantom (DDPM, seed 0) as run.py does: timing only, ungated.

Reported per path: median wall seconds, the sum of layer times split into convolutions and the rest
(reorders, fused element-wise subgraphs, MVN, reductions), and the int8/bf16 ratios of both. Written
to benchmarks/results/openvino-unet-profile-<cpu>-<date>.json with lscpu.
"""

from __future__ import annotations

import argparse
import collections
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bsldm_fast import modeldir  # noqa: E402
from bsldm_fast.config import preset  # noqa: E402
from bsldm_fast.engines import int8  # noqa: E402
from bsldm_fast.engines.graphs import graph_spec  # noqa: E402
from bsldm_fast.engines.onnx_export import export_model_dir, torch_reference  # noqa: E402
from bsldm_fast.engines.openvino import EMBEDDING_INPUT, compile_graph  # noqa: E402
from bsldm_fast.engines.tuning import network_inputs  # noqa: E402
from bsldm_fast.models.unet import timestep_embedding  # noqa: E402
from checks import check_output  # noqa: E402
from timing import lscpu, machine, machine_slug, write_new  # noqa: E402

PATHS = (("bf16 exporter chain", "bf16", False), ("bf16", "bf16", True), ("int8", "int8", False))
"""(name, precision, GroupNorms rewritten)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="paper", help="model preset for random weights (default paper)")
    parser.add_argument("--model-dir", default=None, help="a model directory with its int8 U-Net IR")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("nncf").setLevel(logging.WARNING)

    scratch = tempfile.TemporaryDirectory(prefix="bsldm-ov-profile-") if args.model_dir is None else None
    if scratch is not None:
        path = Path(scratch.name) / "model"
        model = modeldir.random_model(preset(args.config))
        modeldir.save(path, model.config, model.vqgan, model.unet)
        int8.int8_ir(path, model, "unet", calibration_images=[], phantoms=(0,), runs=(("ddpm", None, 0),))
        weights = f"{args.config}, random weights; int8 IR calibrated on one phantom, ungated (timing only)"
    else:
        path = Path(args.model_dir)
        model = modeldir.load(path)
        if int8.int8_refusal(path, "unet") is not None:
            logging.warning("the int8 U-Net of %s: %s (profiled anyway)", path, int8.int8_refusal(path, "unet"))
        weights = str(path)
    config = model.config
    onnx_file = export_model_dir(path, "fp32", ("unet",), model=model)[0].path

    u, t = network_inputs(model)["unet"]
    u, t = u[:1], t[:1]
    reference = torch_reference("unet", model, {"U": u, "t": t})  # the graph's contract: eps
    every_input = {"U": u.numpy(), "t": t.numpy(),
                   EMBEDDING_INPUT: timestep_embedding(t, config.unet.model_channels).numpy()}

    requests, checks, feeds = {}, {}, {}
    for name, precision, rewrite in PATHS:
        source = int8.int8_ir_path(path, "unet") if precision == "int8" else onnx_file
        # As the runner compiles it (`compile_graph`), with the per-layer counters on.
        request = requests[name] = compile_graph(source, "unet", graph_spec("unet", config), 1, "bf16",
                                                 group_norms=rewrite,
                                                 properties={"PERF_COUNT": True}).create_infer_request()
        # t stays an input only where the graph's conditioning scaling reads it (split_model).
        names = {n for port in request.model_inputs for n in port.get_names()}
        feeds[name] = {k: v for k, v in every_input.items() if k in names}
        request.infer(feeds[name])
        out = torch.from_numpy(np.array(request.get_output_tensor(0).data, dtype=np.float32))
        checks[name] = check_output(out, reference, precision)
        logging.info("%s: %s", name, checks[name])
        if not checks[name].passed:
            raise SystemExit(f"{name} failed its check against fp32 PyTorch: {checks[name]}; not timed")

    layer_s = {name: collections.defaultdict(float) for name in requests}
    wall = {name: [] for name in requests}
    for name, request in requests.items():
        request.infer(feeds[name])
    for _ in range(args.rounds):
        for name, request in requests.items():
            start = time.perf_counter()
            request.infer(feeds[name])
            wall[name].append(time.perf_counter() - start)
            for layer in request.profiling_info:
                layer_s[name][layer.node_type] += layer.real_time.total_seconds() / args.rounds

    paths = {}
    for name in requests:
        layers = dict(sorted(layer_s[name].items(), key=lambda kv: -kv[1]))
        total, conv = sum(layers.values()), layers.get("Convolution", 0.0)
        paths[name] = {"median_s": float(np.median(wall[name])), "wall_s": wall[name], "layers_s": total,
                       "convolution_s": conv, "other_s": total - conv, "by_layer_type_s": layers,
                       "check": checks[name].as_dict()}
        print(f"{name:20s} median {paths[name]['median_s']:.3f} s; layers {total:.3f} = convolutions "
              f"{conv:.3f} + other {total - conv:.3f} (reorder {layers.get('Reorder', 0):.3f}, subgraph "
              f"{layers.get('Subgraph', 0):.3f}, MVN {layers.get('MVN', 0):.3f}, reductions "
              f"{sum(v for k, v in layers.items() if k.startswith('Reduce')):.3f})")
    ratios = {"int8 vs bf16 (ours), step": paths["bf16"]["median_s"] / paths["int8"]["median_s"],
              "int8 vs bf16 (ours), convolutions": paths["bf16"]["convolution_s"] / paths["int8"]["convolution_s"],
              "int8 vs bf16 exporter chain, step": paths["bf16 exporter chain"]["median_s"] / paths["int8"]["median_s"],
              "bf16 (ours) vs bf16 exporter chain, step":
                  paths["bf16 exporter chain"]["median_s"] / paths["bf16"]["median_s"]}
    for what, ratio in ratios.items():
        print(f"{what}: {ratio:.2f}x")
    import openvino

    info = machine("cpu")
    written = write_new(Path(args.out), f"openvino-unet-profile-{machine_slug(info)}-{time.strftime('%Y-%m-%d')}",
                        {"machine": info, "lscpu": lscpu(), "openvino": openvino.__version__,
                         "model": weights, "rounds": args.rounds, "paths": paths, "ratios": ratios})
    print(f"wrote {written}")


if __name__ == "__main__":
    main()
