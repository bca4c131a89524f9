"""OpenVINO on the CPU: the exported ONNX graphs compiled per batch size, cached in the model directory.

A thin layer over OpenVINO's documented Python API: Core.read_model (the float32 ONNX graph of
`onnx_export`) -> Model.reshape (a static batch) -> the precision split below -> GroupNorms as
per-channel statistics (`openvino_group_norm`: the exporter's chain costs a layout reorder on each
side) -> Core.compile_model on "CPU" with INFERENCE_PRECISION_HINT 'f32' or 'bf16' ->
CompiledModel.export_model, cached as
`engines/openvino/<graph>-<precision>-b<batch>-<digest>.blob` with a JSON manifest of its
`OpenVINOKey` (weights, OpenVINO version, CPU and its flags, precision, graph, batch, recipe).

NOTE: the precision split. Under the bf16 hint the CPU plugin runs every floating-point op in bf16
except a few maths functions, and it ignores per-node rt_info marks set from Python (checked on
2026.4.1: "precise_0" marks change nothing). Two places need float32, so the graphs are cut there
and those parts run in float32 PyTorch beside the compiled model, the way the PyTorch runners do:
- the timestep embedding: t is cast to bf16 (999 -> 1000) and t * freq rounded before cos/sin, so
  the U-Net sees a wrong embedding (error 1e-1 of eps on the small model, 1e-2 with the cut). The
  U-Net graph takes the [cos | sin] embedding as an input `emb` instead, computed by
  `models.unet.timestep_embedding` in float32;
- the codebook search: the distance matmul in bf16 flips near-tied codes. The encoder graph ends at
  the float32 latent before quantisation, and `kernels.vq_quantize` picks the codes in float32.

Precision 'int8' (engines/int8.py): each network (U-Net, VQ decoder, VQ encoder) whose NNCF int8 IR
passed the model's quality gate runs from that IR, its float layers under the bf16 hint and with the
same cuts (the int8 encoder IR is quantised already cut, so the search never sees int8) but with its
GroupNorms as NNCF left them, the graph the gate measured; the others run bf16, and the runner logs
why for each (`int8_refusals`, `int8_networks`).
"""

from __future__ import annotations

import importlib.util
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .. import kernels
from .._files import atomic_write
from ..config import ModelConfig
from ..models import VQGAN, UNet
from ..models.unet import timestep_embedding
from .cache import (ENGINE_DIR, EngineError, cpu_identity, differences, key_digest, manifest_path,
                    model_hash, read_manifest, write_manifest)
from .graphs import GRAPH_NAMES, GraphSpec, graph_spec
from .openvino_group_norm import rewrite_group_norms

if TYPE_CHECKING:  # openvino is an optional dependency (the `openvino` extra), imported where used
    import openvino

logger = logging.getLogger(__name__)

INSTALL_HINT = "OpenVINO is not installed: pip install 'bsldm-fast[openvino]'"
OPENVINO_DIR = "openvino"
OPENVINO_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}
"""Our precision names -> OpenVINO's INFERENCE_PRECISION_HINT."""
RECIPE = 2
"""Version of what this module does to a graph before compiling (the cuts, the GroupNorm rewrite,
the properties); part of the cache key, so a change here rebuilds every cached blob. 2: GroupNorms
as per-channel statistics (`openvino_group_norm`)."""
COMPILE_PROPERTIES = {"PERFORMANCE_HINT": "LATENCY"}
"""One stream using every core: the pipeline runs one request at a time."""
EMBEDDING_INPUT = "emb"


def openvino_module():
    """`import openvino`, or EngineError saying how to get it."""
    try:
        import openvino
    except ImportError as error:
        raise EngineError(INSTALL_HINT) from error
    return openvino


def openvino_unavailable(device: torch.device | str = "cpu") -> str | None:
    """Why the OpenVINO runner cannot run on `device` (with the fix), or None when it can."""
    device = torch.device(device)
    if device.type != "cpu":
        return f"OpenVINO runs the networks on the CPU here, not on {device}; pass device 'cpu'"
    try:
        ov = openvino_module()
    except EngineError as error:
        return str(error)
    if importlib.util.find_spec("onnx") is None:
        return "OpenVINO compiles the exported ONNX graphs, and onnx is not installed: " \
               "pip install 'bsldm-fast[openvino]'"
    if "CPU" not in ov.Core().available_devices:
        return "OpenVINO sees no CPU device on this machine"
    return None


@dataclass(frozen=True)
class OpenVINOKey:
    """What a compiled OpenVINO model depends on; any change makes it stale."""

    graph: str
    precision: str
    batch: int
    model_hash: str
    openvino_version: str
    cpu_name: str
    cpu_flags: str
    """Digest of the CPU's instruction-set flags (/proc/cpuinfo)."""
    recipe: int

    def digest(self) -> str:
        return key_digest(self)

    def file_name(self) -> str:
        return f"{self.graph}-{self.precision}-b{self.batch}-{self.digest()}.blob"

    def same_target(self, other: "OpenVINOKey") -> bool:
        """Same graph, precision, batch and CPU: `other` is this blob compiled for an older state."""
        return (self.graph, self.precision, self.batch, self.cpu_name, self.cpu_flags) == (
            other.graph, other.precision, other.batch, other.cpu_name, other.cpu_flags)


def cache_dir(model_dir: str | Path) -> Path:
    return Path(model_dir) / ENGINE_DIR / OPENVINO_DIR


def openvino_key(model_dir: str | Path, graph: str, precision: str, batch: int) -> OpenVINOKey:
    ov = openvino_module()
    return OpenVINOKey(graph, precision, batch, model_hash(model_dir), ov.get_version(), *cpu_identity(),
                       RECIPE)


def _cached(model_dir: str | Path) -> list[tuple[Path, OpenVINOKey]]:
    directory = cache_dir(model_dir)
    found = []
    if directory.is_dir():
        for file in sorted(directory.glob("*.blob")):
            key = read_manifest(file, OpenVINOKey)
            if isinstance(key, OpenVINOKey):
                found.append((file, key))
    return found


def ensure_compiled(model_dir: str | Path, key: OpenVINOKey, build) -> tuple["openvino.CompiledModel", bool]:
    """(compiled model, built now): the cached blob of `key` imported, or `build()` compiled and
    cached when missing or stale. A stale blob (same graph, precision, batch and CPU, older key) is
    logged with what changed and removed; a blob is never used without its matching manifest."""
    ov = openvino_module()
    core = ov.Core()
    properties = _properties(key.precision)
    file = cache_dir(model_dir) / key.file_name()
    if file.is_file() and read_manifest(file, OpenVINOKey) == key:
        try:
            return core.import_model(file.read_bytes(), "CPU", properties), False
        except RuntimeError as error:
            logger.warning("rebuilding the OpenVINO %s (%s, batch %d) of %s: %s does not load (%s)",
                           key.graph, key.precision, key.batch, model_dir, file.name, error)
    stale = [(f, old) for f, old in _cached(model_dir) if f != file and old.same_target(key)]
    if stale:
        logger.info("rebuilding the OpenVINO %s (%s, batch %d) of %s: %s", key.graph, key.precision,
                    key.batch, model_dir, "; ".join(differences(stale[-1][1], key)))
    compiled = build()
    stream = io.BytesIO()
    compiled.export_model(stream)
    blob = stream.getvalue()
    file.parent.mkdir(parents=True, exist_ok=True)
    manifest_path(file).unlink(missing_ok=True)
    atomic_write(file, lambda tmp: Path(tmp).write_bytes(blob))
    write_manifest(file, key)
    for old_file, _ in stale:
        old_file.unlink(missing_ok=True)
        manifest_path(old_file).unlink(missing_ok=True)
    return compiled, True


def _properties(precision: str) -> dict[str, str]:
    if precision not in OPENVINO_PRECISIONS:
        raise ValueError(f"OpenVINO precision must be one of {sorted(OPENVINO_PRECISIONS)}, "
                         f"got {precision!r}")
    return {"INFERENCE_PRECISION_HINT": OPENVINO_PRECISIONS[precision], **COMPILE_PROPERTIES}


# The precision split (see the module docstring) -------------------------------------------------

def _single(items: list, what: str):
    if len(items) != 1:
        raise EngineError(f"cannot split the graph for OpenVINO: expected one {what}, found {len(items)}")
    return items[0]


def split_model(model: "openvino.Model", graph: str) -> "openvino.Model":
    """The graph with its float32 parts cut out: the encoder ends at the latent before quantisation;
    the U-Net takes the timestep embedding as input `emb` (t stays an input when conditioning
    scaling reads it). The decoder is returned as is. `model` must have static shapes."""
    ov = openvino_module()
    from openvino import opset13 as ops

    if graph == "decoder":
        return model
    nodes = model.get_ordered_ops()
    if graph == "encoder":
        # The latent: the one tensor the exporter's `/encoder/` scope hands to its `/quantizer/`
        # scope (EncoderGraph's module names).
        sources = {(src.get_node().get_friendly_name(), src.get_index()): src
                   for node in nodes if node.get_friendly_name().startswith("/quantizer/")
                   for src in (i.get_source_output() for i in node.inputs())
                   if src.get_node().get_friendly_name().startswith("/encoder/")}
        latent = _single(list(sources.values()), "latent entering the quantiser")
        result = ops.result(latent)
        result.get_output_tensor(0).set_names({"latent"})
        return ov.Model([result], list(model.get_parameters()), model.get_friendly_name())
    if graph == "unet":
        cos = _single([n for n in nodes if n.get_type_name() == "Cos"], "Cos (the timestep embedding)")
        concat = _single([t.get_node() for t in cos.output(0).get_target_inputs()
                          if t.get_node().get_type_name() == "Concat"], "Concat of cos and sin")
        emb = ops.parameter(concat.get_output_partial_shape(0), ov.Type.f32, name=EMBEDDING_INPUT)
        emb.get_output_tensor(0).set_names({EMBEDDING_INPUT})
        for target in list(concat.output(0).get_target_inputs()):
            target.replace_source_output(emb.output(0))
        split = ov.Model(list(model.get_results()), list(model.get_parameters()) + [emb],
                         model.get_friendly_name())
        used = {op.get_friendly_name() for op in split.get_ordered_ops()}
        unused = [p for p in split.get_parameters() if p.get_friendly_name() not in used]
        for parameter in unused:
            split.remove_parameter(parameter)
        return split
    raise ValueError(f"unknown graph {graph!r}; choose one of {GRAPH_NAMES}")


def compile_graph(source, graph: str, spec: GraphSpec, batch: int, precision: str,
                  split: bool = True, group_norms: bool = True,
                  properties: dict | None = None) -> "openvino.CompiledModel":
    """Compile an ONNX graph or OpenVINO IR (a file path) or an in-memory onnx.ModelProto for the CPU
    at one batch size: read, reshape to static shapes, split (`split_model`; `split=False` for a
    graph already cut, the int8 encoder IR), rewrite its GroupNorms
    (`openvino_group_norm.rewrite_group_norms`; `group_norms=False` for an int8 IR, kept as the gate
    measured it), compile in `precision` (`properties`: more compile properties, e.g. PERF_COUNT)."""
    ov = openvino_module()
    core = ov.Core()
    if isinstance(source, (str, Path)):
        model = core.read_model(str(source))
    else:
        model = core.read_model(source.SerializeToString(), ov.Tensor(np.empty(0, dtype=np.uint8)))
    model.reshape({name: ov.PartialShape(list(shape)) for name, shape in spec.shapes(batch).items()})
    if split:
        model = split_model(model, graph)
    rewritten = rewrite_group_norms(model) if group_norms else 0
    logger.info("compiling the OpenVINO %s (%s, batch %d%s)", graph, precision, batch,
                f", {rewritten} GroupNorms as per-channel statistics" if rewritten else "")
    return core.compile_model(model, "CPU", {**_properties(precision), **(properties or {})})


def runtime_precisions(compiled: "openvino.CompiledModel") -> dict[tuple[str, str], int]:
    """(layer type, runtime precision) -> count in the compiled model: what actually runs in bf16."""
    counts: dict[tuple[str, str], int] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        key = (info["layerType"].astype(str), info["runtimePrecision"].astype(str))
        counts[key] = counts.get(key, 0) + 1
    return counts


class OpenVINORunner:
    """The three networks as OpenVINO models compiled for the CPU, one per (graph, batch size),
    compiled on first use: from the model directory's cached fp32 ONNX graphs (and then cached
    there, `ensure_compiled`), or, for a model without a (writable) directory, from graphs exported
    in memory and compiled uncached. `precision` is OpenVINO's inference-precision hint ('fp32' or 'bf16');
    see the module docstring for what stays float32.

    'int8' runs each network whose int8 IR passed the model's quality gate (engines/int8.py) from
    that IR, its float layers under the bf16 hint, and the others in bf16, logging why for each.
    `int8_networks` limits which networks may run int8 at all (default: every one); `gated=False` is
    for the gate itself (benchmarks/int8_gate.py): those networks run int8 whenever their IR exists,
    the verdict being what is measured."""

    def __init__(self, config: ModelConfig, vqgan: VQGAN, unet: UNet, precision: str = "fp32",
                 model_dir: str | Path | None = None, device: torch.device | str = "cpu",
                 step_backend: str = "auto", gated: bool = True,
                 int8_networks: "tuple[str, ...] | list[str] | None" = None):
        reason = openvino_unavailable(device)
        if reason is not None:
            raise EngineError(f"the OpenVINO runner cannot run: {reason}")
        self.int8_refusals: dict[str, str | None] = {}
        """For an 'int8' runner, network -> why it runs in bf16 (None: it runs int8)."""
        if precision == "int8":
            from .int8 import NETWORKS, int8_refusal

            wanted = NETWORKS if int8_networks is None else tuple(int8_networks)
            unknown = sorted(set(wanted) - set(NETWORKS))
            if unknown:
                raise ValueError(f"unknown int8 networks {unknown}; choose from {NETWORKS}")
            for network in NETWORKS:
                if network not in wanted:
                    self.int8_refusals[network] = f"the {network} was not asked to run int8"
                    continue
                refusal = int8_refusal(model_dir, network) if gated else _ir_missing(model_dir, network)
                self.int8_refusals[network] = refusal
                if refusal is not None:
                    logger.warning("running the %s in bf16, not int8: %s", network, refusal)
            if all(r is not None for r in self.int8_refusals.values()):
                logger.warning("no network of this model runs int8: every network runs in bf16")
        else:
            _properties(precision)  # validates it
        self.int8_networks: tuple[str, ...] = tuple(n for n, r in self.int8_refusals.items() if r is None)
        """The networks that run int8 (empty unless precision is 'int8')."""
        self.name = "openvino"
        self.precision = precision
        """'fp32', 'bf16', or 'int8': the gated int8 networks (engines/int8.py), bf16 for the others."""
        self.config = config
        self.device = torch.device("cpu")
        self.step_backend = kernels.resolve(step_backend, self.device)
        self.int8_dir = None if model_dir is None else Path(model_dir)
        self.model_dir = None if model_dir is None else Path(model_dir)
        if self.model_dir is not None and not os.access(self.model_dir, os.W_OK):
            logger.warning("%s is read-only: compiling the OpenVINO models there without caching them",
                           self.model_dir)
            self.model_dir = None
        self.vqgan, self.unet = vqgan, unet
        self.codes = vqgan.quantizer.embedding.weight.detach().to("cpu", torch.float32).contiguous()
        self._requests: dict[tuple[str, int], "openvino.InferRequest"] = {}
        self.built: dict[tuple[str, int], bool] = {}
        """(graph, batch) -> whether it was compiled (True) or imported from the cache (False)."""

    @property
    def int8_refusal(self) -> str | None:
        """Why an 'int8' runner runs its U-Net in bf16 (None: the int8 U-Net runs, or not 'int8')."""
        return self.int8_refusals.get("unet")

    def _source(self, graph: str):
        """The fp32 ONNX graph: the model directory's file (exported if missing), else in memory."""
        from .onnx_export import export_graph, export_model_dir
        from .graphs import graph_module

        networks = [m if next(m.parameters()).dtype == torch.float32 and next(m.parameters()).is_cpu
                    else _cpu_float_copy(m) for m in (self.vqgan, self.unet)]
        if self.model_dir is not None:
            from ..modeldir import Model

            model = Model(self.config, *networks, str(self.model_dir))
            return export_model_dir(self.model_dir, "fp32", (graph,), model=model)[0].path
        return export_graph(graph_module(graph, self.config, *networks), graph_spec(graph, self.config))

    def request(self, graph: str, batch: int) -> "openvino.InferRequest":
        """The infer request of `graph` at `batch`, compiled (or loaded from the cache) on first use."""
        request = self._requests.get((graph, batch))
        if request is None:
            spec = graph_spec(graph, self.config)
            precision = "bf16" if self.precision == "int8" else self.precision

            def build():
                return compile_graph(self._source(graph), graph, spec, batch, precision)

            if graph in self.int8_networks:
                from .int8 import int8_ir_path

                # Not cached: the IR is already compiled once by NNCF, and its key (calibration,
                # gate) is the IR's manifest, not the weights alone. The encoder IR is already cut
                # at the float32 latent; the U-Net IR still takes the cut of its embedding.
                compiled = compile_graph(int8_ir_path(self.int8_dir, graph), graph, spec, batch, "bf16",
                                         split=graph != "encoder", group_norms=False)
                built = True
            elif self.model_dir is None:
                compiled, built = build(), True
            else:
                key = openvino_key(self.model_dir, graph, precision, batch)
                compiled, built = ensure_compiled(self.model_dir, key, build)
            request = self._requests[(graph, batch)] = compiled.create_infer_request()
            self.built[(graph, batch)] = built
        return request

    def _run(self, graph: str, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = next(iter(feeds.values())).shape[0]
        request = self.request(graph, batch)
        names = {name for i in request.model_inputs for name in i.get_names()}
        request.infer({name: np.ascontiguousarray(value.detach().cpu().numpy())
                       for name, value in feeds.items() if name in names})
        # The request owns its output memory and reuses it on the next call: copy.
        return torch.from_numpy(np.array(request.get_output_tensor(0).data, dtype=np.float32))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        z = self._run("encoder", {"image": images.float()})
        return kernels.vq_quantize(z, self.codes, backend=self.step_backend)[0]

    def denoise(self, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.expand(u.shape[0]) if t.dim() == 0 else t
        emb = timestep_embedding(t.cpu(), self.config.unet.model_channels)
        return self._run("unet", {"U": u.float(), "t": t.to(torch.int64), EMBEDDING_INPUT: emb})

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._run("decoder", {"latent": latents.float()})


def _ir_missing(model_dir: str | Path | None, network: str = "unet") -> str | None:
    from .int8 import int8_ir_path

    if model_dir is None or not int8_ir_path(model_dir, network).is_file():
        return f"no int8 {network} IR in {model_dir} (engines/int8.py int8_ir builds it)"
    return None


def _cpu_float_copy(module: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(module).to("cpu", torch.float32).eval()
