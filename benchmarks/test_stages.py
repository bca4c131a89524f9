"""The stages of run.py as a pytest-benchmark suite; never part of the tests' pass/fail.

    pytest benchmarks --benchmark-only                     # the `small` config
    BSLDM_BENCH_CONFIG=paper pytest benchmarks --benchmark-only

Same registry as run.py (stage rows of its quick plan for one config); backends that are not
present here are skipped with the reason. The original-style end-to-end row times only its first
steps here (run.py scales them to the whole loop).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # noqa: E402

CONFIG = os.environ.get("BSLDM_BENCH_CONFIG", "small")
DEVICE = torch.device(os.environ.get("BSLDM_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
PLAN = dataclasses.replace(run.PLANS["quick"], configs=(CONFIG,),
                           throughput_batch={CONFIG: run.PLANS["quick"].throughput_batch.get(CONFIG, 2)},
                           compile=bool(os.environ.get("BSLDM_BENCH_COMPILE")))
SCENARIOS = [s for s in run.scenarios(PLAN, DEVICE) if s.group == "stages"]


@pytest.fixture(scope="module")
def context():
    return run.Context(DEVICE, PLAN), run.backends(DEVICE)


def _id(s: run.Scenario) -> str:
    tail = f"-{s.sampler}{s.steps}" if s.sampler != "-" else ""
    return f"{s.stage}-{s.backend}-{s.precision}-b{s.batch}{tail}"


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[_id(s) for s in SCENARIOS])
def test_stage(benchmark, context, scenario):
    ctx, table = context
    ready = run.prepare(scenario, ctx, table)
    if isinstance(ready, str):
        pytest.skip(ready)
    _, _, config, prepared = ready
    benchmark.group = f"{scenario.stage} {CONFIG}"
    benchmark.extra_info.update(dataclasses.asdict(scenario), resolution=config.image_size, flops=prepared.flops,
                                note=prepared.note)
    rounds = 1 if scenario.heavy else 3
    benchmark.pedantic(prepared.fn, rounds=rounds, warmup_rounds=0 if scenario.heavy else 1, iterations=1)
