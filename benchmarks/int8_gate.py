"""The int8 networks' quality gate on held-out real pairs, and the paper U-Net's step time on the CPU.

    python benchmarks/int8_gate.py [--model-dir DIR] [--held-out 2] [--training 0,1] \
        [--calibrate 0,1] [--seeds 0-4] [--networks unet,decoder,encoder] [--no-timing]

Quality: each pair's CXR runs through the whole pipeline (the product's preprocessing, DDPM at its
default steps, the output anchor) with the same seeds: once with every network in OpenVINO bf16 (the
reference), then with int8 IRs (`engines/int8.py`) for a growing set of networks, the others bf16.
The set grows greedily in `--networks` order (default U-Net, decoder, encoder): a network is added to
the set that passed so far and kept when the pipeline with that set stays within 0.3 dB PSNR and
0.005 SSIM of the reference's mean over seeds on every held-out pair; a network that fails is
recorded with its measured drop and left bf16. PSNR and SSIM against the real soft tissue are as in
real_quality.py (bsldm_fast.metrics at 1024 px, images scaled by their stored type). Training pairs
are reported, labelled, and do not vote. The verdict (per network, with each IR's key) goes to
MODEL_DIR/engines/openvino/int8-gate.json, the whole record to
benchmarks/results/int8-gate-<cpu>-<date>.json.

Timing: the paper U-Net (random weights, batch 1, its latent size), median of 3 calls after a
warm-up, OpenVINO bf16 (the fp32 ONNX graph with the bf16 inference-precision hint) vs OpenVINO int8
(calibrated on phantoms through the paper model's own pipeline) vs torch bf16 eager, each output
first compared with the fp32 torch U-Net on the same real-looking input.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bsldm_fast import metrics, modeldir, preprocess  # noqa: E402
from bsldm_fast.diffusion.plan import DEFAULT_SAMPLER, resolve_steps  # noqa: E402
from bsldm_fast.engines import int8  # noqa: E402
from bsldm_fast.engines.onnx_export import relative_error  # noqa: E402
from bsldm_fast.engines.openvino import OpenVINORunner  # noqa: E402
from bsldm_fast.engines.runners import make_runner  # noqa: E402
from bsldm_fast.io import read_image  # noqa: E402
from bsldm_fast.pipeline import Pipeline  # noqa: E402
from bsldm_fast.training.trainer import trained_real_pairs  # noqa: E402
from real_quality import parse_seeds  # noqa: E402
from timing import lscpu, machine, machine_slug, measure, write_new  # noqa: E402

logger = logging.getLogger("int8_gate")
DEMO = ROOT / "bsldm_fast" / "assets" / "demo_model"


def _unit(path: Path) -> np.ndarray:
    # As real_quality.py: the metrics' scale (float64, by the stored type).
    return preprocess.scale_by_dtype(read_image(path))


def _soft_tissue(pipeline: Pipeline, cxr: np.ndarray, seeds: list[int]) -> list[np.ndarray]:
    """The product's path (Suppressor._unit_batch) for one image and several seeds, in one batch."""
    prepared = preprocess.model_input(cxr, pipeline.config)
    inputs = [prepared] * len(seeds)
    batch = torch.cat([p.tensor for p in inputs])
    soft = pipeline.run(batch, seeds, DEFAULT_SAMPLER, resolve_steps(DEFAULT_SAMPLER, None))
    return [p.astype(np.float64) for p in preprocess.model_outputs(soft, inputs, pipeline.config)]


def _summary(rows: list[dict], preds: dict, pair: str, role: str, candidate: str) -> dict:
    mean = {name: {k: float(np.mean([r[k] for r in rows if r["pair"] == pair and r["pipeline"] == name]))
                   for k in ("psnr", "ssim", "bsr")} for name in ("bf16", candidate)}
    agreement = [metrics.psnr(b, i) for b, i in zip(preds["bf16"], preds[candidate])]
    return {"role": role, **mean,
            "psnr_drop": mean["bf16"]["psnr"] - mean[candidate]["psnr"],
            "ssim_drop": mean["bf16"]["ssim"] - mean[candidate]["ssim"],
            "int8_vs_bf16_psnr_db": float(np.mean(agreement))}


def quality(model_dir: Path, pairs: Path, held_out: list[str], training: list[str],
            calibrate: list[str], seeds: list[int], options: dict | None,
            order: tuple[str, ...] = int8.NETWORKS) -> dict:
    """Greedy over `order`: each network is added to the int8 set that passed so far, and kept when
    the whole pipeline with that set stays within the bounds on every held-out pair."""
    model = modeldir.load(model_dir)
    seen = trained_real_pairs(model_dir) or []
    for pair in held_out:
        if pair in seen:
            raise SystemExit(f"{model_dir} was trained on pair {pair}; it cannot be held out")
    calibration = [pairs / "cxr" / f"{c}.png" for c in calibrate]
    if any(c in held_out for c in calibrate):
        raise SystemExit("calibrating on a held-out pair's CXR would leak it into the gate")
    irs, build_s = {}, {}
    for network in order:
        started = time.perf_counter()
        irs[network] = str(int8.int8_ir(model_dir, model, network, calibration,
                                        options=(options or {}).get(network)))
        build_s[network] = time.perf_counter() - started
        logger.info("%s IR ready in %.1f s", network, build_s[network])
    # The product's runners: OpenVINO bf16, and OpenVINO with the int8 networks (bf16 for the rest).
    bf16 = Pipeline(model.config, OpenVINORunner(model.config, model.vqgan, model.unet, "bf16", model_dir), "cpu")
    data = {pair: (_unit(pairs / "cxr" / f"{pair}.png"), _unit(pairs / "soft" / f"{pair}.png"))
            for pair in held_out + training}
    rows = []

    def measure_pipeline(name: str, pipeline: Pipeline) -> dict[str, list[np.ndarray]]:
        preds = {}
        for pair, (cxr, soft) in data.items():
            role = "held-out" if pair in held_out else "training"
            preds[pair] = _soft_tissue(pipeline, cxr, seeds)
            for seed, pred in zip(seeds, preds[pair]):
                scores = metrics.evaluate(pred, soft, cxr).as_dict()
                rows.append({"pair": pair, "role": role, "pipeline": name, "seed": seed,
                             "psnr": scores["psnr"], "ssim": scores["ssim"], "bsr": scores["bsr"]})
        return preds

    reference = measure_pipeline("bf16", bf16)
    accepted: list[str] = []
    configurations, networks = [], {}
    for network in order:
        trial = accepted + [network]
        name = "int8:" + "+".join(trial)
        runner = OpenVINORunner(model.config, model.vqgan, model.unet, "int8", model_dir, gated=False,
                                int8_networks=trial)
        assert runner.int8_networks == tuple(n for n in int8.NETWORKS if n in trial), runner.int8_refusals
        preds = measure_pipeline(name, Pipeline(model.config, runner, "cpu"))
        summary = {}
        for pair in data:
            role = "held-out" if pair in held_out else "training"
            summary[pair] = _summary(rows, {"bf16": reference[pair], name: preds[pair]}, pair, role, name)
            logger.info("%s, pair %s (%s): %s", name, pair, role, json.dumps(summary[pair]))
        failures = [f"pair {p}: PSNR {s['psnr_drop']:+.3f} dB, SSIM {s['ssim_drop']:+.4f} below bf16"
                    for p, s in summary.items() if s["role"] == "held-out"
                    and (s["psnr_drop"] > int8.GATE_PSNR_DB or s["ssim_drop"] > int8.GATE_SSIM)]
        held = {p: {"psnr_drop": s["psnr_drop"], "ssim_drop": s["ssim_drop"]}
                for p, s in summary.items() if s["role"] == "held-out"}
        if failures:
            reason = f"with int8 {'+'.join(trial)}: " + "; ".join(failures)
        else:
            accepted.append(network)
            reason = f"within the bounds on every held-out pair with int8 {'+'.join(trial)}"
        networks[network] = {"passed": not failures, "reason": reason, "measured_with": trial,
                             "held_out_drops": held, "calibration": int8.calibration_record(model_dir, network),
                             "options": int8.network_options(network, (options or {}).get(network))}
        configurations.append({"int8": trial, "passed": not failures, "summary": summary})
        logger.info("%s: %s", network, reason)
    unet = networks.get("unet", {"passed": False, "reason": "not measured"})
    verdict = {
        "networks": networks,
        "passed": unet["passed"],  # the U-Net-only format's fields (the U-Net's verdict)
        "reason": unet["reason"],
        "order": list(order),
        "rule": "greedy in this order: a network is added to the int8 set that passed so far and kept "
                "when the pipeline with the set stays within the bounds on every held-out pair",
        "bounds": {"psnr_db": int8.GATE_PSNR_DB, "ssim": int8.GATE_SSIM},
        "held_out": held_out, "training_pairs_reported": training, "seeds": seeds,
        "sampler": DEFAULT_SAMPLER, "steps": resolve_steps(DEFAULT_SAMPLER, None),
        "reference": "OpenVINO bf16 runner (encoder, U-Net, decoder; timestep embedding and codebook "
                     "search float32)",
        "candidate": "the same runner with the named networks' int8 IRs (bf16 hint for their float "
                     "layers; the timestep embedding and the codebook search float32): what "
                     "--backend openvino --precision int8 runs",
        "configurations": configurations,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    int8.write_gate(model_dir, verdict)
    return {**verdict, "int8_networks": accepted, "model_dir": str(model_dir), "irs": irs,
            "ir_build_s": build_s, "rows": rows}


def paper_timing(repeats: int = 3) -> dict:
    """Step time of the paper U-Net, batch 1: OpenVINO bf16 and int8 vs torch bf16 eager."""
    from bsldm_fast.engines.graphs import graph_module, graph_spec
    from bsldm_fast.engines.onnx_export import _save, export_graph
    from bsldm_fast.models.latent import LatentDenoiser

    model = modeldir.random_model("paper")
    config = model.config
    with tempfile.TemporaryDirectory(dir=ROOT / "outputs") as scratch:
        onnx_file = Path(scratch) / "unet-fp32.onnx"
        started = time.perf_counter()
        proto = export_graph(graph_module("unet", config, model.vqgan, model.unet), graph_spec("unet", config))
        _save(proto, str(onnx_file))
        del proto
        export_s = time.perf_counter() - started
        # Real-looking inputs: the U-Net's inputs while sampling phantoms with this model's pipeline.
        images, names = int8.calibration_units(model, [], phantoms=(0, 1))
        started = time.perf_counter()
        feeds = int8.calibration_set(model, images[:1], runs=(("ddpm", None, 0),))
        probe = int8.calibration_set(model, images[1:], runs=(("ddpm", None, 9),))[4]
        quantized = int8.quantize_unet(onnx_file, feeds)
        quantize_s = time.perf_counter() - started
        # The symmetric preset, for speed: asymmetric activations cost a zero-point correction.
        symmetric = int8.quantize_unet(onnx_file, feeds, {"preset": "performance"})
        ov, _ = int8.require_openvino()
        core = ov.Core()
        fp32 = core.read_model(str(onnx_file))
        static = {"U": [1, *probe["U"].shape[1:]], "t": [1]}
        for graph in (fp32, quantized, symmetric):
            # Batch 1 fixed, as a runner compiled for its batch would have it.
            graph.reshape(static)
        hint = {"INFERENCE_PRECISION_HINT": "bf16"}
        compiled = {
            "openvino-bf16": core.compile_model(fp32, "CPU", hint),
            "openvino-int8": core.compile_model(quantized, "CPU", hint),
            "openvino-int8-performance-preset": core.compile_model(symmetric, "CPU", hint),
        }
        u, t = torch.from_numpy(probe["U"]), torch.from_numpy(probe["t"])
        with torch.inference_mode():
            reference = LatentDenoiser(model.unet, config).eval()(u, t).numpy()
        runner = make_runner(config, model.vqgan, model.unet, "cpu", "bf16", "torch")
        calls = {name: (lambda c=c: c({"U": probe["U"], "t": probe["t"]})[0]) for name, c in compiled.items()}

        def torch_bf16():
            with torch.inference_mode():
                return runner.denoise(u, t).float().numpy()

        calls["torch-bf16-eager"] = torch_bf16
        rows = {}
        for name, call in calls.items():
            out = np.asarray(call(), np.float32)
            err = relative_error(out, reference)
            rms = float(np.sqrt(((out - reference) ** 2).mean() / (reference ** 2).mean()))
            timing = measure(call, warmup=1, repeats=repeats)
            rows[name] = {"median_s": timing.median, "times": timing.times, "peak_rss_mib": timing.peak_rss_mib,
                          "max_rel_error_vs_fp32": err, "rms_rel_error_vs_fp32": rms}
            logger.info("%s: %s", name, rows[name])
    base = rows["openvino-bf16"]["median_s"]
    for row in rows.values():
        row["speedup_vs_openvino_bf16"] = base / row["median_s"]
    return {"model": "random_model('paper')", "latent": config.latent_size, "batch": 1,
            "timestep": int(probe["t"][0]), "calibration": {"images": names[:1], "inputs": len(feeds)},
            "export_s": export_s, "calibrate_and_quantize_s": quantize_s, "rows": rows,
            "bar": "int8 >= 1.6x the bf16 U-Net",
            "int8_vs_openvino_bf16": base / rows["openvino-int8"]["median_s"],
            "int8_vs_torch_bf16": rows["torch-bf16-eager"]["median_s"] / rows["openvino-int8"]["median_s"],
            "shapes": "OpenVINO graphs reshaped to a static batch of 1"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default=str(DEMO), help="model directory (the IR is written in it)")
    parser.add_argument("--pairs", default=str(ROOT / "assets" / "szch_samples"))
    parser.add_argument("--held-out", default="2")
    parser.add_argument("--training", default="0,1", help="pairs also reported, labelled as training")
    parser.add_argument("--calibrate", default="0,1", help="pairs whose CXR calibrates (plus phantoms)")
    parser.add_argument("--seeds", default="0-4")
    parser.add_argument("--options", default=None,
                        help='NNCF options per network as JSON, over the defaults: {"decoder": {...}}')
    parser.add_argument("--networks", default=",".join(int8.NETWORKS),
                        help="the networks tried in int8, in the order the greedy gate adds them")
    parser.add_argument("--no-quality", action="store_true")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    split = lambda text: [p.strip() for p in text.split(",") if p.strip()]  # noqa: E731
    ov, nncf = int8.require_openvino()
    info = machine("cpu")
    record = {"machine": info, "lscpu": lscpu(), "openvino": ov.__version__, "nncf": nncf.__version__,
              "torch_threads": torch.get_num_threads(),
              "load_average_at_start": os.getloadavg()}
    if not args.no_quality:
        record["quality"] = quality(Path(args.model_dir), Path(args.pairs), split(args.held_out),
                                    split(args.training), split(args.calibrate), parse_seeds(args.seeds),
                                    json.loads(args.options) if args.options else None,
                                    tuple(split(args.networks)))
        logger.info("int8 networks: %s", record["quality"]["int8_networks"])
        for network, entry in record["quality"]["networks"].items():
            logger.info("%s: %s", network, entry["reason"])
    if not args.no_timing:
        record["paper_unet_timing"] = paper_timing()
        record["load_average_at_end"] = os.getloadavg()
    path = write_new(Path(args.out), f"int8-gate-{machine_slug(info)}-{info['date']}", record)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
