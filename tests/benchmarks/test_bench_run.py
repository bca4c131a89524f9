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


def _wrong_backend(how: str):
    """The eager bf16 pipeline broken `how`: a denoiser returning NaN, or 10 % off, or images
    mirrored left to right (what a layout bug does)."""
    class Broken:
        def __init__(self, runner):
            self.name, self.precision, self.codes = f"broken-{how}", runner.precision, runner.codes
            self.runner = runner

        def encode(self, images):
            return self.runner.encode(images)

        def denoise(self, u, t):
            eps = self.runner.denoise(u, t)
            return eps if how == "mirror" else eps * (math.nan if how == "nan" else 1.1)

        def decode(self, z):
            image = self.runner.decode(z)
            return image.flip(-1) if how == "mirror" else image

    def build(ctx, model, precision):
        p = run._eager(ctx, model, precision)
        return run.Pipeline(p.config, Broken(p.runner), p.device, p.step_backend)
    return run.Backend(f"broken-{how}", ("fp32", "bf16"), build)


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
