"""The benchmark machinery on the tiny config: rows carry every field, the JSON has its schema, the
original-style loop is scaled honestly, and the README summary replaces only its block."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


run = _load("run")
summary = _load("summary")

ROW_FIELDS = {"stage", "backend", "precision", "sampler", "steps", "batch", "resolution", "config", "group",
              "median", "minimum", "maximum", "spread", "repeats", "times", "per_image_s", "flops",
              "achieved_flops", "fraction_of_peak", "peak_rss_mib", "mem_kind", "note", "compile_s", "check"}


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    plan = dataclasses.replace(run.PLANS["smoke"], repeats=2, heavy_repeats=2, original_steps=2)
    ctx = run.Context(torch.device("cpu"), plan)
    table = run.backends(torch.device("cpu"))
    S = run.Scenario
    todo = [S("vq-encode", "torch-eager", "fp32", "tiny"),
            S("unet-step", "torch-eager", "fp32", "tiny", 2),
            S("sampler-step", "original-style", "fp32", "tiny", 1, 0, "ddpm", 3),
            S("sampler-step", "torch-eager", "fp32", "tiny", 1, 0, "dpmpp", 3),
            S("end-to-end", "original-style", "fp32", "tiny", 1, 0, "ddpm", 1000, heavy=True),
            S("end-to-end", "torch-eager", "fp32", "tiny", 1, 0, "dpmpp", 3),
            S("end-to-end", "tensorrt", "fp16", "tiny")]
    results = [run.run_scenario(s, ctx, table) for s in todo]
    rows = [r for r in results if isinstance(r, run.Row)]
    peaks = {"fp32": 1e11, "bf16": 4e11}
    path = run.write_results(rows, peaks, "test-machine", tmp_path_factory.mktemp("results"),
                             extra={"mode": "smoke", "headline": {"tiny": run.headline(rows, peaks, "tiny")},
                                    "skipped": []})
    return todo, results, rows, peaks, path


def test_rows_carry_every_field_and_json_schema(measured):
    todo, results, rows, peaks, path = measured
    assert isinstance(results[-1], str) and "CUDA" in results[-1]  # TensorRT is skipped with a reason
    assert len(rows) == len(todo) - 1
    payload = json.loads(path.read_text())
    assert {"machine", "matmul_peak_flops", "rows", "headline", "mode"} <= payload.keys()
    assert len(payload["rows"]) == len(rows)
    for row in payload["rows"]:
        assert ROW_FIELDS <= row.keys(), ROW_FIELDS - row.keys()
        assert 0 < row["minimum"] <= row["median"] <= row["maximum"]
        assert row["peak_rss_mib"] > 0
        assert row["per_image_s"] == pytest.approx(row["median"] / row["batch"])
        if row["stage"] in ("unet-step", "end-to-end", "vq-encode"):
            assert row["flops"] > 0
            assert row["achieved_flops"] == pytest.approx(row["flops"] / row["median"])
            assert row["fraction_of_peak"] == pytest.approx(row["achieved_flops"] / peaks[row["precision"]])
            assert row["fraction_of_bf16_peak"] == pytest.approx(row["achieved_flops"] / peaks["bf16"])


def test_original_style_is_scaled_from_timed_steps(measured):
    _, _, rows, _, _ = measured
    orig = next(r for r in rows if r.stage == "end-to-end" and r.backend == "original-style")
    assert orig.steps == 1000 and "timed 2 of 1000 steps" in orig.note and "scaled" in orig.note
    # Two runs x two timed steps: four estimates of encode + decode + 1000 steps.
    assert orig.timing.repeats == 4
    loop = run.OriginalStyle.__module__  # the module the loop lives in
    times = sys.modules[loop].LoopTimes(encode=1.0, steps=[0.1, 0.3], decode=2.0, total_steps=1000)
    assert times.estimate() == pytest.approx(1.0 + 2.0 + 1000 * 0.2)
    assert times.estimate(0.3) == pytest.approx(303.0)


def test_registry_covers_stages_sizes_and_batches():
    full = run.scenarios(run.PLANS["full"], torch.device("cpu"), "fused-cpp")
    stages = [s for s in full if s.group == "stages"]
    for config, batch in (("small", 1), ("small", 8), ("paper", 1), ("paper", 2)):
        assert {s.stage for s in stages if s.config == config and s.batch == batch} == set(run.STAGE_ORDER)
    assert {s.backend for s in stages} >= {"original-style", "torch-eager", "torch-compile", "fused-cpp", "tensorrt"}
    for plan in ("quick", "full"):
        todo = run.scenarios(run.PLANS[plan], torch.device("cpu"), "fused-cpp")
        assert sorted(s.resolution for s in todo if s.group == "scaling-resolution" and s.stage == "unet-step") == [
            256, 512, 1024]
        assert any(s.group == "scaling-batch" for s in todo) and any(s.group == "scaling-steps" for s in todo)
        assert any(s.config == "paper" and s.batch > 1 for s in todo if s.group == "stages")


def test_summary_replaces_only_its_block(measured, tmp_path):
    *_, path = measured
    text = summary.markdown(summary.latest(path.parent), config="tiny")
    assert "original-style" in text and "| torch-eager | fp32 | dpmpp-3 | 1 |" in text
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{summary.BEGIN}\nold numbers\n{summary.END}\nafter\n")
    summary.replace_block(readme, text)
    out = readme.read_text()
    assert out.startswith("# title\n\nbefore\n") and out.endswith(f"{summary.END}\nafter\n")
    assert "old numbers" not in out and text.strip() in out
    (tmp_path / "plain.md").write_text("no markers\n")
    with pytest.raises(ValueError, match="perf:begin"):
        summary.replace_block(tmp_path / "plain.md", text)


def test_results_are_never_overwritten_and_the_summary_prefers_full_runs(tmp_path, monkeypatch):
    timing = sys.modules["timing"]
    clock = iter(f"2026-01-01T00:00:0{i}Z" for i in range(10))

    def machine(device="cpu"):
        return {"date": "2026-01-01", "time_utc": next(clock), "device": "cpu", "processor": "p"}
    monkeypatch.setattr(timing, "machine", machine)

    def write(mode, tag="", suffix=""):
        return timing.write_results([], {}, "box", tmp_path, suffix=suffix,
                                    extra={"mode": mode, "tag": tag, "headline": {}})
    full = write("full")
    again = write("full")
    quick = write("quick", suffix="-quick")
    dev = write("full", tag="dev", suffix="-dev")
    assert [p.name for p in (full, again, quick, dev)] == [
        "box-2026-01-01.json", "box-2026-01-01-2.json", "box-2026-01-01-quick.json", "box-2026-01-01-dev.json"]
    assert json.loads(full.read_text())["machine"]["time_utc"].endswith("00Z")  # the first is kept
    assert not list(tmp_path.glob(".*.tmp"))
    # The newest full run wins over a newer quick one; tagged runs only when asked.
    assert [p["machine"]["time_utc"] for p in summary.latest(tmp_path)] == ["2026-01-01T00:00:01Z"]
    assert [p["tag"] for p in summary.latest(tmp_path, include_tagged=True)] == ["dev"]
    # The same run may rewrite its own file (the GPU suite saves after every part).
    assert timing.write_results([], {}, "box", tmp_path, extra={"mode": "x"}, path=full) == full
    assert json.loads(full.read_text())["mode"] == "x"


def test_summary_reads_the_gpu_suite_but_not_its_dry_run(tmp_path, monkeypatch):
    timing = sys.modules["timing"]

    def rows():
        def row(backend, precision, steps, seconds):
            t = timing.Timing(seconds, seconds, seconds, 1, 0.0, "none", [seconds])
            check = {"passed": True, "metric": "psnr_db", "value": 50.0, "bound": 25.0, "precision": precision}
            return timing.Row("end-to-end", backend, precision, 1, 1024, "ddpm", steps, t, 1e12, "paper",
                              "gpu-suite", "eager; 10 steps timed and scaled to 1000" if steps == 1000 else "",
                              check=check)
        return [row("original-style", "fp32", 1000, 80.0), row("torch-compile", "bf16", 10, 0.25)]

    for device, name in (("NVIDIA H100 80GB HBM3", "gpu-h100"), ("cpu", "gpu-dryrun-cpu")):
        info = {"date": "2026-01-01", "time_utc": "2026-01-01T00:00:00Z", "device": device,
                "processor": "p", "threads": 16, "torch": "2.11"}
        monkeypatch.setattr(timing, "machine", lambda device="cpu", info=info: info)
        timing.write_results(rows(), {}, name, tmp_path, extra={"suite": {"mode": "full"}})
    payloads = summary.latest(tmp_path)
    assert [p["machine"]["device"] for p in payloads] == ["NVIDIA H100 80GB HBM3"]
    text = summary.markdown(payloads)
    assert "**NVIDIA H100 80GB HBM3**" in text and "`benchmarks/gpu_suite.sh`, full run" in text
    assert "| torch-compile | bf16 | ddpm-10 | 1 | 0.25 s | 320× |" in text
    assert "original-style: 10 steps timed and scaled to 1000." in text


def test_the_peak_times_the_same_product_as_a_convolution(gen):
    """The CPU peak also times `a @ b` as a 1x1 convolution: it must be that product, n^3 FMAs."""
    timing = sys.modules["timing"]
    a, b = torch.randn(128, 128, generator=gen), torch.randn(128, 128, generator=gen)
    out = timing.gemm_as_conv(a, b)()
    assert out.shape == (1, 128, 2, 64)
    torch.testing.assert_close(out.permute(0, 2, 3, 1).reshape(128, 128), a @ b, rtol=1e-5, atol=1e-4)
    assert timing.matmul_peak(torch.float32, sizes=(128,), repeats=2) > 0


# ---------------------------------------------------------------------------------------------
# Correctness before timing (issue 20): a path whose output is wrong is never a row.

checks = sys.modules["checks"]


def _wrong_backend(how: str, base: str = "torch-eager"):
    """The pipeline of backend `base` (eager torch by default, or a peer) broken `how`: a denoiser
    returning NaN, or 10 % off, or images mirrored left to right (what a layout bug does). One
    delegating wrapper (`engine_peers.RunnerWith`) around whatever runner `base` builds."""
    RunnerWith = sys.modules["engine_peers"].RunnerWith

    def denoise(own, u, t):
        eps = own(u, t)
        return eps if how == "mirror" else eps * (math.nan if how == "nan" else 1.1)

    def decode(own, z):
        image = own(z)
        return image.flip(-1) if how == "mirror" else image

    def build(ctx, model, precision):
        p = run.backends(torch.device("cpu"))[base].build(ctx, model, precision)
        broken = RunnerWith(p.runner, f"broken-{how}", wrap=True, denoise=denoise, decode=decode)
        return run.Pipeline(p.config, broken, p.device, p.step_backend)
    name = f"broken-{how}" + ("" if base == "torch-eager" else f"-{base}")
    original = run.backends(torch.device("cpu"))[base]
    return run.Backend(name, original.precisions, build, original.available, kind=original.kind)


@pytest.fixture(scope="module")
def broken_table():
    table = run.backends(torch.device("cpu"))
    for how in ("nan", "off", "mirror"):
        b = _wrong_backend(how)
        table[b.name] = b
    return table


@pytest.mark.parametrize("stage, how", [("unet-step", "nan"), ("unet-step", "off"), ("end-to-end", "nan"),
                                        ("end-to-end", "mirror"), ("vq-decode", "mirror")])
def test_a_path_with_a_wrong_output_is_recorded_failed_not_timed(broken_table, how, stage, monkeypatch):
    plan = dataclasses.replace(run.PLANS["smoke"], repeats=2)
    ctx = run.Context(torch.device("cpu"), plan)
    timed = []
    monkeypatch.setattr(run, "measure", lambda *a, **k: timed.append(a) or pytest.fail("a failed row was timed"))
    s = run.Scenario(stage, f"broken-{how}", "bf16", "tiny", 1, 0, "ddpm", 4)
    result = run.run_scenario(s, ctx, broken_table)
    assert isinstance(result, run.Failed), result
    assert not result.check.passed and not timed
    if how == "nan":
        assert result.check.nonfinite > 0 and "not finite" in result.reason
    elif how == "off":
        # 10 % off: far beyond bf16's bound, and the measured error is what is recorded.
        assert result.check.value == pytest.approx(0.1, rel=0.1)
        assert result.check.value > checks.REL_MAX_ERROR["bf16"]
    elif stage == "end-to-end":
        assert result.check.metric == "psnr_db" and result.check.value < checks.MIN_PSNR_DB["bf16"]


def test_a_correct_reduced_precision_path_passes_its_check(broken_table):
    ctx = run.Context(torch.device("cpu"), dataclasses.replace(run.PLANS["smoke"], repeats=2))
    row = run.run_scenario(run.Scenario("unet-step", "torch-eager", "bf16", "tiny"), ctx, broken_table)
    assert isinstance(row, run.Row)
    assert row.check["passed"] and row.check["metric"] == "rel_max_error"
    assert 0 < row.check["value"] <= checks.REL_MAX_ERROR["bf16"]


def test_check_output_bounds(gen):
    ref = torch.randn(2, 4, 16, 16, generator=gen)
    assert checks.check_output(ref.clone(), ref, "fp32").passed
    near = ref + 1e-6 * torch.randn(ref.shape, generator=gen)
    assert checks.check_output(near, ref, "fp32").passed
    bf16 = ref.to(torch.bfloat16)
    assert checks.check_output(bf16, ref, "bf16").passed and not checks.check_output(bf16, ref, "fp32").passed
    nan = ref.clone()
    nan[0, 0, 0, 0] = math.nan
    c = checks.check_output(nan, ref, "bf16")
    assert not c.passed and c.nonfinite == 1
    assert not checks.check_output(ref[:1], ref, "fp32").passed  # a wrong shape is wrong
    img = torch.rand(1, 1, 32, 32, generator=gen) * 2 - 1
    assert checks.check_output(img + 0.002, img, "bf16", image=True).passed  # ~60 dB
    assert not checks.check_output(torch.zeros_like(img), img, "bf16", image=True).passed
    assert not checks.check_finite(nan, "fp32").passed and checks.check_finite(ref, "fp32").passed


def test_summary_refuses_unchecked_results_and_names_failed_rows(tmp_path, monkeypatch, capsys):
    timing = sys.modules["timing"]
    clock = iter(f"2026-01-01T00:00:0{i}Z" for i in range(10))
    info = lambda device="cpu": {"date": "2026-01-01", "time_utc": next(clock), "device": "cpu",  # noqa: E731
                                 "processor": "p", "threads": 2, "torch": "t"}
    monkeypatch.setattr(timing, "machine", info)
    ok = checks.Check(True, "psnr_db", 40.0, 25.0, "bf16").as_dict()

    def row(backend, precision, seconds, check):
        t = timing.Timing(seconds, seconds, seconds, 1, 0.0, "rss", [seconds])
        return timing.Row("end-to-end", backend, precision, 1, 1024, "ddpm", 10, t, 1e12, "paper", check=check)
    failed = [{"stage": "unet-step", "backend": "torch-compile", "precision": "bf16", "config": "paper",
               "batch": 1, "group": "stages", "reason": "correctness check failed",
               "check": checks.Check(False, "rel_max_error", math.nan, None, "bf16", 4096,
                                     "4096 of 4096 outputs not finite").as_dict()}]
    checked = timing.write_results([row("original-style", "fp32", 1000.0, ok), row("torch-eager", "bf16", 10.0, ok)],
                                   {}, "box", tmp_path, extra={"mode": "full", "tag": "", "headline": {},
                                                               "failed": failed})
    # A newer run whose rows carry no check (as before issue 20) must not replace it.
    timing.write_results([row("torch-compile", "bf16", 1.0, None)], {}, "box", tmp_path,
                         extra={"mode": "full", "tag": "", "headline": {}})
    payloads = summary.latest(tmp_path)
    assert [p["machine"]["time_utc"] for p in payloads] == [json.loads(checked.read_text())["machine"]["time_utc"]]
    assert "refusing box-2026-01-01-2.json" in capsys.readouterr().err
    text = summary.markdown(payloads)
    assert "| torch-eager | bf16 | ddpm-10 | 1 | 10.0 s | 100× |" in text
    assert "| torch-compile |" not in text
    assert "- unet-step torch-compile bf16 `paper` batch 1: 4096 of 4096 outputs not finite" in text


# ---------------------------------------------------------------------------------------------
# The CPU paths (issue 19): our OpenVINO runner and the peers in the same registry, checked like
# every row; cpu-best built from the rows measured before it.

CPU_ENGINES = ("openvino", "onnxruntime", "openvino-default", "cpu-best")


def test_the_cpu_engines_are_in_every_plan_before_cpu_best():
    for plan in ("quick", "full"):
        todo = run.scenarios(run.PLANS[plan], torch.device("cpu"), "fused-cpp")
        for config in ("small", "paper"):
            rows = [s for s in todo if s.config == config and s.group == "stages" and s.batch == 1]
            engines = {(s.stage, s.backend, s.precision) for s in rows}
            for stage in ("vq-encode", "unet-step", "vq-decode"):
                assert {(stage, "openvino", p) for p in ("fp32", "bf16", "int8")} <= engines
                assert {(stage, "onnxruntime", "fp32"), (stage, "openvino-default", "bf16")} <= engines
            assert {("end-to-end", b, p) for b, p in (("cpu-best", "bf16"), ("cpu-best", "int8"),
                                                       ("onnxruntime", "fp32"), ("openvino-default", "bf16"))} <= engines
            # cpu-best picks from the stage rows of ours: they all come before it.
            first_best = min(i for i, s in enumerate(rows) if s.backend == "cpu-best")
            assert all(i < first_best for i, s in enumerate(rows) if s.stage in run.NETWORK_OF)
    table = run.backends(torch.device("cpu"))
    assert {table[b].kind for b in ("onnxruntime", "openvino-default")} == {"peer"}
    assert {table[b].kind for b in ("openvino", "cpu-best", "torch-eager")} == {"ours"}
    assert not any(s.backend in CPU_ENGINES for s in run.scenarios(run.PLANS["full"], torch.device("cuda")))


def test_the_cpu_engines_are_skipped_with_why_when_their_runtime_is_missing(monkeypatch):
    for module in ("openvino", "onnxruntime"):
        monkeypatch.setitem(sys.modules, module, None)  # `import openvino` raises ImportError
    ctx = run.Context(torch.device("cpu"), run.PLANS["smoke"])
    table = run.backends(torch.device("cpu"))
    why = {b: run.run_scenario(run.Scenario("unet-step", b, p, "tiny"), ctx, table)
           for b, p in (("openvino", "bf16"), ("onnxruntime", "fp32"), ("openvino-default", "bf16"))}
    assert all(isinstance(w, str) for w in why.values()), why
    assert "OpenVINO is not installed" in why["openvino"]
    assert why["onnxruntime"] == "onnxruntime is not installed"
    assert why["openvino-default"] == "openvino is not installed"
    gpu = run.run_scenario(run.Scenario("unet-step", "onnxruntime", "fp32", "tiny"),
                           run.Context(torch.device("cuda"), run.PLANS["smoke"]), table)
    assert "CPU" in gpu


def _needs(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")


@pytest.fixture(scope="module")
def engine_ctx():
    """One tiny model (and model directory) for the engine tests."""
    return run.Context(torch.device("cpu"), dataclasses.replace(run.PLANS["smoke"], repeats=2))


@pytest.mark.parametrize("stage, backend, precision", [
    ("unet-step", "onnxruntime", "fp32"), ("vq-encode", "onnxruntime", "fp32"),
    ("unet-step", "openvino", "bf16"), ("vq-decode", "openvino-default", "bf16")])
def test_a_cpu_engine_row_on_tiny_passes_its_check(engine_ctx, stage, backend, precision):
    _needs("onnxruntime" if backend == "onnxruntime" else "openvino")
    _needs("onnx")
    row = run.run_scenario(run.Scenario(stage, backend, precision, "tiny"), engine_ctx, run.backends(torch.device("cpu")))
    assert isinstance(row, run.Row), row
    assert row.check["passed"] and row.kind == ("ours" if backend == "openvino" else "peer")
    if stage == "vq-encode":
        assert row.check["metric"] == "rel_max_error"  # fp32: element-wise, a flipped code fails
    else:
        assert row.check["value"] <= checks.REL_MAX_ERROR[precision]
    # The peers' error is measured, not assumed: fp32 graphs agree with eager fp32 to rounding.
    if precision == "fp32":
        assert row.check["value"] < 1e-5
    assert row.rate > 0 and row.timing.median > 0


@pytest.mark.parametrize("stage, how", [("unet-step", "nan"), ("vq-decode", "mirror"), ("end-to-end", "off")])
def test_a_broken_peer_is_recorded_failed_not_timed(engine_ctx, stage, how, monkeypatch):
    _needs("onnxruntime")
    _needs("onnx")
    table = dict(run.backends(torch.device("cpu")))
    broken = _wrong_backend(how, "onnxruntime")
    table[broken.name] = broken
    monkeypatch.setattr(run, "measure", lambda *a, **k: pytest.fail("a failed row was timed"))
    s = run.Scenario(stage, broken.name, "fp32", "tiny", 1, 0, "ddpm", 3)
    result = run.run_scenario(s, engine_ctx, table)
    assert isinstance(result, run.Failed), result
    assert not result.check.passed
    if how == "nan":
        assert result.check.nonfinite > 0
    elif stage == "end-to-end":
        assert result.check.metric == "psnr_db" and result.check.value < checks.MIN_PSNR_DB["fp32"]


def test_check_codes_counts_changed_codes(gen):
    ref = torch.randn(1, 4, 8, 8, generator=gen)
    out = ref.clone()
    out[0, :, 0, :3] += 1.0  # three of 64 positions move to another code
    c = checks.check_codes(out, ref, "bf16")
    assert c.passed and c.metric == "changed_codes" and c.value == pytest.approx(3 / 64)
    out[0, :, 1:, :] += 1.0
    assert not checks.check_codes(out, ref, "bf16").passed
    assert not checks.check_codes(ref + 1e-3, ref, "fp32").passed  # fp32 stays element-wise


def _row(stage, backend, precision, seconds, config="tiny", kind="ours"):
    t = sys.modules["timing"].Timing(seconds, seconds, seconds, 1, 0.0, "rss", [seconds])
    return run.Row(stage, backend, precision, 1, 64, timing=t, flops=1e9, config=config, kind=kind)


def test_best_rows_pick_the_fastest_checked_row_of_ours():
    rows = [_row("vq-encode", "torch-eager", "bf16", 0.3), _row("vq-encode", "openvino", "bf16", 0.2),
            _row("vq-encode", "onnxruntime", "fp32", 0.01, kind="peer"),  # a peer is never picked
            _row("vq-encode", "fused-cpp", "fp32", 0.01),  # nor a row of another precision
            _row("unet-step", "openvino", "bf16", 0.1), _row("unet-step", "torch-compile", "bf16", 0.15),
            _row("unet-step", "openvino", "int8", 0.12),
            _row("vq-decode", "torch-eager", "bf16", 0.4), _row("vq-decode", "openvino", "bf16", 0.5),
            _row("vq-decode", "openvino", "bf16", 0.01, config="small")]  # nor another config
    best = run.best_rows(rows, "tiny", 64, "bf16")
    assert {n: (r.backend, r.precision) for n, r in best.items()} == {
        "encoder": ("openvino", "bf16"), "unet": ("openvino", "bf16"), "decoder": ("torch-eager", "bf16")}
    # int8: among the int8 and the bf16 rows; the int8 U-Net loses to OpenVINO's bf16 one here.
    best = run.best_rows(rows, "tiny", 64, "int8")
    assert {n: (r.backend, r.precision) for n, r in best.items()} == {
        "encoder": ("openvino", "bf16"), "unet": ("openvino", "bf16"), "decoder": ("torch-eager", "bf16")}
    rows.append(_row("unet-step", "openvino", "int8", 0.05))
    assert (run.best_rows(rows, "tiny", 64, "int8")["unet"].precision, run.best_rows(rows, "tiny", 64, "bf16")[
        "unet"].precision) == ("int8", "bf16")
    assert "no checked bf16 vq-decode row" in run.best_rows(rows[:7], "tiny", 64, "bf16")


def test_cpu_best_is_built_from_the_measured_rows_and_checked(engine_ctx):
    _needs("openvino")
    _needs("onnx")
    table = run.backends(torch.device("cpu"))
    s = run.Scenario("end-to-end", "cpu-best", "bf16", "tiny", 1, 0, "ddpm", 3)
    engine_ctx.rows = []
    assert "no checked bf16 vq-encode row" in run.run_scenario(s, engine_ctx, table)
    engine_ctx.rows = [_row("vq-encode", "openvino", "bf16", 0.1), _row("vq-encode", "torch-eager", "bf16", 0.2),
                       _row("unet-step", "torch-eager", "bf16", 0.1), _row("unet-step", "openvino", "bf16", 0.3),
                       _row("vq-decode", "torch-eager", "bf16", 0.1)]
    row = run.run_scenario(s, engine_ctx, table)
    assert isinstance(row, run.Row), row
    assert row.check["passed"] and row.check["metric"] == "psnr_db"
    assert "encoder=openvino bf16 (0.1 s), unet=torch-eager bf16 (0.1 s), decoder=torch-eager bf16" in row.note
    runner = engine_ctx.pipeline(("cpu-best", "bf16"), lambda: pytest.fail("not built"), exclusive=True).runner
    assert runner.name == "encoder=openvino,unet=torch,decoder=torch"


def test_headline_sets_our_best_beside_the_best_peer():
    rows = [_row("unet-step", "openvino", "int8", 0.5), _row("unet-step", "torch-eager", "bf16", 1.0),
            _row("unet-step", "onnxruntime", "fp32", 1.2, kind="peer"),
            _row("unet-step", "openvino-default", "bf16", 0.8, kind="peer"), _row("vq-decode", "openvino", "bf16", 3.0)]
    versus = run.headline(rows, {"fp32": 1e11, "bf16": 4e11, "int8": 8e11}, "tiny")["ours_vs_peer"]
    unet = versus["unet-step"]
    assert (unet["ours"], unet["peer"]) == ("openvino int8", "openvino-default bf16")
    assert unet["peer_over_ours"] == pytest.approx(0.8 / 0.5)
    assert unet["ours_of_peak"] == pytest.approx(1e9 / 0.5 / 8e11)  # int8: of the int8 GEMM rate
    assert "peer" not in versus["vq-decode"] and "peer_over_ours" not in versus["vq-decode"]


def test_summary_sets_the_cpu_paths_beside_the_peers(tmp_path, monkeypatch):
    rows = [dataclasses.replace(r, check={"passed": True}) for r in (
        _row("unet-step", "openvino", "int8", 0.5), _row("unet-step", "torch-eager", "bf16", 1.0),
        _row("unet-step", "onnxruntime", "fp32", 1.2, kind="peer"), _row("vq-decode", "openvino", "bf16", 3.0))]
    peaks = {"fp32": 1e11, "bf16": 4e11, "int8": 8e11}
    failed = [{"stage": "unet-step", "backend": "openvino-default", "precision": "bf16", "config": "tiny",
               "batch": 1, "group": "stages", "reason": "check failed",
               "check": {"metric": "rel_max_error", "value": 0.07, "precision": "bf16", "bound": 0.03}}]
    monkeypatch.setattr(run, "machine_slug", lambda info: "box")
    path = sys.modules["timing"].write_results(
        rows, peaks, "box", tmp_path, suffix="-partial",
        extra={"mode": "full-partial", "tag": "", "headline": {"tiny": run.headline(rows, peaks, "tiny")},
               "failed": failed})
    payload = json.loads(path.read_text())
    assert summary.has_peers(payload, "tiny") and not summary.has_peers(payload, "paper")
    text = summary.peers_section(payload, "tiny")
    header = next(line for line in text.splitlines() if line.startswith("| stage | openvino"))
    assert header.index("openvino int8") < header.index("torch-eager bf16") < header.index("onnxruntime fp32 (peer)")
    unet = next(line for line in text.splitlines() if line.startswith("| U-Net step | 0.5 s"))
    assert "failed: rel_max_error 0.07, above the bf16 bound 0.03" in unet and "1.2 s" in unet
    assert "| U-Net step | openvino int8 | 0.5 s | 0% | onnxruntime fp32 | 1.2 s | 2.40× |" in text
    assert "| VQ decode | openvino bf16 | 3 s |" in text and "| VQ decode | openvino bf16 | 3 s | 0% | — | — | — |" in text
    # The README block: the newest run with peers is found beside the machine's full run.
    found = summary.latest(tmp_path, want=lambda p: summary.has_peers(p, "tiny"))
    assert [p["mode"] for p in found] == ["full-partial"]
    assert "CPU paths, ours beside the peers" in summary.markdown(found, "tiny", found)


def test_configs_and_backends_filter_the_run(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(run, "matmul_peak", lambda *a, **k: 1e11)
    monkeypatch.setattr(run, "int8_gemm_peak", lambda: {"ops_per_s": 2e11, "how": "fake", "candidates": {}})
    monkeypatch.setattr(run, "run_scenario", lambda s, ctx, table: ran.append(s) or "not run (test)")
    assert run.main(["--configs", "paper", "--backends", "onnxruntime,cpu-best", "--only", "unet-step,end-to-end",
                     "--no-scaling", "--out", str(tmp_path)]) == 0
    assert ran and {s.config for s in ran} == {"paper"}
    assert {(s.stage, s.backend) for s in ran} == {("unet-step", "onnxruntime"), ("end-to-end", "onnxruntime"),
                                                   ("end-to-end", "cpu-best")}
    payload = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert payload["mode"] == "full-partial" and payload["matmul_peak_flops"]["int8"] == 2e11
    with pytest.raises(SystemExit):
        run.main(["--backends", "no-such-engine", "--out", str(tmp_path)])
