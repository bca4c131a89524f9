"""ONNX export of the encoder (with quantisation), the decoder and the U-Net, and its check.

Decisions, each checked by tests/engines:
- opset 17, standard ops only (torch's TorchScript exporter; no custom domains).
- Attention leaves the exporter as Mul(q, s) and Mul(k, s) -> MatMul -> Softmax -> MatMul with
  s = head_dim**-0.25 (`F.scaled_dot_product_attention`'s symbolic), the pattern TensorRT's attention
  fusion expects: it requires Q and K each multiplied by sqrt(scale) before the first batched matmul
  (TensorRT docs, "Fused Attention"). The exporter computes s from Shape ops; `fold_constants` folds
  them into constants, so the pattern is plain at parse time.
- GroupNorm exports as Reshape -> InstanceNormalization -> Reshape -> Mul -> Add at opsets 17-20.
  The U-Net's `GroupNorm32` upcasts to float32 explicitly, so an fp16/bf16 graph carries
  Cast(float32) -> InstanceNormalization -> Cast(back) and a strongly typed TensorRT network keeps
  the normalisation in float32 by type, with no per-layer precision hints.
- The graphs have float32 I/O and a dynamic batch; the spatial sizes are the model's, fixed.
"""

from __future__ import annotations

import copy
import io
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from .. import __version__
from .._files import atomic_write
from ..modeldir import Model
from ..models.latent import LatentDenoiser
from .cache import ONNX_DIR, EngineError, OnnxKey, model_hash, read_manifest, write_manifest
from .graphs import GRAPH_NAMES, ONNX_PRECISIONS, GraphSpec, graph_module, graph_spec

if TYPE_CHECKING:  # onnx is an optional dependency (the `onnx` extra), imported where used
    import onnx

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17
# ONNX admits bfloat16 Conv, Gemm and InstanceNormalization only from opset 22.
BF16_OPSET = 22
TORCH_MAX_OPSET = 20
# The bound for a float32 graph run by onnxruntime against PyTorch (max-abs relative).
CHECK_TOLERANCE = 1e-4
EXPORT_BATCH = 2
# Folding stops at results this large: it is meant for shape arithmetic, not for copying weights.
_FOLD_MAX_ELEMENTS = 1 << 16
_NONDETERMINISTIC = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                     "Multinomial", "Bernoulli"}


def engine_opset(precision: str) -> int:
    """The opset of the graphs engines are built from (fp8/int8 start from the fp32 export)."""
    return BF16_OPSET if precision == "bf16" else DEFAULT_OPSET


def onnx_path(model_dir: str | Path, graph: str, precision: str) -> Path:
    return Path(model_dir) / ONNX_DIR / f"{graph}-{precision}.onnx"


def converted(model: Model, precision: str,
              device: torch.device | str = "cpu") -> tuple[nn.Module, nn.Module]:
    """(vqgan, unet) in the compute dtype of `precision` on `device`; copies when that converts.
    The codebook stays float32, as in the PyTorch runners."""
    dtype = ONNX_PRECISIONS[precision]
    device = torch.device(device)
    if dtype == torch.float32 and device.type == "cpu":
        return model.vqgan.eval(), model.unet.eval()
    vqgan, unet = (copy.deepcopy(m).to(device, dtype).eval() for m in (model.vqgan, model.unet))
    vqgan.quantizer.float()
    return vqgan, unet


def export_graph(module: nn.Module, spec: GraphSpec, opset: int = DEFAULT_OPSET) -> "onnx.ModelProto":
    """Trace `module` to ONNX with a dynamic batch and fold its static shape arithmetic.

    Opsets above what torch's exporter writes (20) are reached with onnx's version converter.
    """
    import onnx
    from onnx import version_converter

    device = next(module.parameters()).device
    feeds = {k: v.to(device) for k, v in
             spec.sample_inputs(EXPORT_BATCH, torch.Generator().manual_seed(0)).items()}
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about Python ints taken from shapes; the batch is declared dynamic and
        # the others are fixed by design, and the onnxruntime check covers other batch sizes.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, tuple(feeds.values()), buffer, dynamo=False,
            opset_version=min(opset, TORCH_MAX_OPSET),
            input_names=list(spec.inputs), output_names=list(spec.outputs),
            dynamic_axes=spec.dynamic_axes(), do_constant_folding=True,
        )
    proto = fold_constants(onnx.load_from_string(buffer.getvalue()))
    if opset > TORCH_MAX_OPSET:
        proto = version_converter.convert_version(proto, opset)
    return proto


def _dims(value_info) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") else None
            for d in value_info.type.tensor_type.shape.dim]


def _run_node(node, opset_import, values: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Evaluate one node on constant inputs with onnx's reference implementation."""
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    inputs = [name for name in node.input if name]
    graph = helper.make_graph(
        [node], "fold", [], [helper.make_empty_tensor_value_info(o) for o in node.output],
        initializer=[numpy_helper.from_array(np.asarray(values[n]), n) for n in inputs],
    )
    model = helper.make_model(graph, opset_imports=opset_import)
    return ReferenceEvaluator(model).run(None, {})


def fold_constants(model: "onnx.ModelProto", max_rounds: int = 8) -> "onnx.ModelProto":
    """`fold_once` until nothing changes: each round's constants sharpen the next round's shapes."""
    for _ in range(max_rounds):
        before = len(model.graph.node)
        model = fold_once(model)
        if len(model.graph.node) == before:
            break
    return model


def _skeleton(model: "onnx.ModelProto") -> "onnx.ModelProto":
    """A copy for shape inference: large weights keep their type and dims but not their values
    (inference reads only shapes of those; a 1.5 GB U-Net is otherwise copied on every round)."""
    import onnx

    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model) if model.ByteSize() < (1 << 26) else _copy_without_weights(model, skeleton)
    return skeleton


def _copy_without_weights(model, skeleton) -> None:
    from onnx import TensorProto

    graph = model.graph
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    skeleton.graph.name = graph.name
    skeleton.graph.node.extend(graph.node)
    skeleton.graph.input.extend(graph.input)
    skeleton.graph.output.extend(graph.output)
    for init in graph.initializer:
        if np.prod(init.dims) <= _FOLD_MAX_ELEMENTS:
            skeleton.graph.initializer.append(init)
        else:
            skeleton.graph.initializer.append(
                TensorProto(name=init.name, data_type=init.data_type, dims=init.dims))


def fold_once(model: "onnx.ModelProto") -> "onnx.ModelProto":
    """Fold every small node whose inputs are constants, and `Shape` reads of static dimensions.

    Shape -> Slice/Gather chains that select only static dimensions (e.g. the head size that sets
    the attention scale) become constants even when the batch is dynamic. Nodes left without a
    consumer are removed. The graph computes the same function; the onnxruntime check verifies it.
    """
    import onnx
    from onnx import numpy_helper

    inferred = onnx.shape_inference.infer_shapes(_skeleton(model), data_prop=True)
    graph = model.graph
    known = {vi.name: _dims(vi) for vi in (*inferred.graph.value_info, *inferred.graph.input,
                                          *inferred.graph.output)
             if vi.type.tensor_type.HasField("shape")}
    initializers = {init.name: init for init in graph.initializer}
    consts: dict[str, np.ndarray] = {}
    partial: dict[str, list[int | None]] = {}  # values of Shape outputs with unknown entries

    def const(name: str) -> np.ndarray | None:
        if name in consts:
            return consts[name]
        if name in initializers and np.prod(initializers[name].dims) <= _FOLD_MAX_ELEMENTS:
            consts[name] = numpy_helper.to_array(initializers[name])
            return consts[name]
        return None

    folded: set[int] = set()
    for index, node in enumerate(graph.node):
        inputs = [name for name in node.input if name]
        if node.op_type == "Shape" and node.input[0] in known:
            attrs = {a.name: a.i for a in node.attribute}
            dims = known[node.input[0]][attrs.get("start", 0):attrs.get("end", None)]
            if all(d is not None for d in dims):
                consts[node.output[0]] = np.array(dims, dtype=np.int64)
                folded.add(index)
            else:
                partial[node.output[0]] = dims
            continue
        if node.op_type in ("Gather", "Slice") and node.input[0] in partial and all(
                const(name) is not None for name in inputs[1:]):
            # Apply the op to the positions 0..n-1 to learn which entries it selects.
            dims = partial[node.input[0]]
            positions = np.arange(len(dims), dtype=np.int64)
            picked = _run_node(node, model.opset_import,
                               {**{n: consts[n] for n in inputs[1:]}, node.input[0]: positions})[0]
            values = [dims[i] for i in np.atleast_1d(picked)]
            if all(v is not None for v in values):
                consts[node.output[0]] = np.array(values, dtype=np.int64).reshape(picked.shape)
                folded.add(index)
            continue
        if node.op_type in _NONDETERMINISTIC or not all(const(name) is not None for name in inputs):
            continue
        results = _run_node(node, model.opset_import, {n: consts[n] for n in inputs})
        if any(np.asarray(r).size > _FOLD_MAX_ELEMENTS for r in results):
            continue
        consts.update({name: np.asarray(r) for name, r in zip(node.output, results)})
        folded.add(index)

    # Keep the remaining nodes; the folded values they read become initializers.
    kept = [node for index, node in enumerate(graph.node) if index not in folded]
    needed = {name for node in kept for name in node.input} | {o.name for o in graph.output}
    live: set[str] = {o.name for o in graph.output}
    alive_nodes = []
    for node in reversed(kept):  # drop nodes whose outputs nobody reads
        if any(out in live for out in node.output):
            alive_nodes.append(node)
            live.update(name for name in node.input if name)
    alive_nodes.reverse()
    new_inits = [init for init in graph.initializer if init.name in live]
    existing = {init.name for init in new_inits}
    for name in sorted(live & needed & set(consts)):
        if name not in existing:
            new_inits.append(numpy_helper.from_array(consts[name], name))
    del graph.node[:]
    graph.node.extend(alive_nodes)
    del graph.initializer[:]
    graph.initializer.extend(new_inits)
    del graph.value_info[:]
    return model


def torch_reference(name: str, model: Model, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
    """The plain PyTorch (float32, CPU) output a graph must reproduce: the pipeline's own calls."""
    with torch.inference_mode():
        if name == "encoder":
            return model.vqgan.encode_latent(feeds["image"])
        if name == "decoder":
            return model.vqgan.decode(feeds["latent"])
        return LatentDenoiser(model.unet, model.config)(feeds["U"], feeds["t"])


def onnxruntime_outputs(proto_or_path, feeds: dict[str, torch.Tensor]) -> np.ndarray:
    """Run a graph with onnxruntime on the CPU; the first output."""
    import onnxruntime as ort

    source = str(proto_or_path) if isinstance(proto_or_path, Path) else proto_or_path.SerializeToString()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in feeds.items()})[0]


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected|: the error relative to the output's scale."""
    expected = np.asarray(expected, dtype=np.float64)
    scale = float(np.abs(expected).max()) or 1.0
    return float(np.abs(np.asarray(actual, dtype=np.float64) - expected).max()) / scale


def check_graph(proto_or_path, name: str, model: Model, batch: int = 3,
                generator: torch.Generator | None = None) -> float:
    """Relative error of a float32 graph run by onnxruntime against `torch_reference`."""
    spec = graph_spec(name, model.config)
    feeds = spec.sample_inputs(batch, generator, model.config.diffusion.num_train_timesteps)
    expected = torch_reference(name, model, feeds).numpy()
    actual = onnxruntime_outputs(proto_or_path, feeds)
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: onnxruntime shape {actual.shape} vs PyTorch {expected.shape}")
    return relative_error(actual, expected)


@dataclass
class ExportResult:
    graph: str
    path: Path
    exported: bool
    """False when an up-to-date file was already there."""
    error: float | None = None
    """onnxruntime vs PyTorch relative error, when checked."""


def onnx_key(model_dir: str | Path, graph: str, precision: str, opset: int) -> OnnxKey:
    return OnnxKey(graph, precision, model_hash(model_dir), opset,
                   f"torch {torch.__version__}, bsldm_fast {__version__}")


def export_model_dir(model_dir: str | Path, precision: str = "fp32",
                     graphs: tuple[str, ...] = GRAPH_NAMES, opset: int = DEFAULT_OPSET,
                     check: bool = False, overwrite: bool = False, model: Model | None = None,
                     progress: Callable[[str], None] | None = None) -> list[ExportResult]:
    """Write `onnx/<graph>-<precision>.onnx` for each graph of a model directory.

    An up-to-date graph (its manifest matches the weights, opset and exporter) is kept; a stale one
    this package wrote is replaced; a file without a manifest is someone else's and is replaced
    only with `overwrite`. `check` runs each float32 graph with onnxruntime against PyTorch.
    """
    from .. import modeldir

    if precision not in ONNX_PRECISIONS:
        raise ValueError(f"ONNX precision must be one of {sorted(ONNX_PRECISIONS)}, got {precision!r}")
    if opset < 17:
        raise ValueError(f"opset {opset} is too old; use 17 or newer")
    if check and precision != "fp32":
        raise ValueError("the onnxruntime check compares float32 graphs; export fp32 to check")
    if precision == "bf16":
        opset = max(opset, BF16_OPSET)
    _require("onnx", *(("onnxruntime",) if check else ()))
    model = model if model is not None else modeldir.load(model_dir)
    results = []
    networks = None
    for name in graphs:
        path = onnx_path(model_dir, name, precision)
        key = onnx_key(model_dir, name, precision, opset)
        if path.exists():
            recorded = read_manifest(path, OnnxKey)
            if recorded == key and not overwrite:
                results.append(ExportResult(name, path, exported=False))
                continue
            if recorded is None and not overwrite:
                raise EngineError(f"{path} exists and was not written by bsldm_fast; "
                                  "move it away or pass --overwrite")
        if networks is None:
            # Tracing runs the network once; reduced precision is slow on a CPU, so use a GPU if any.
            device = "cuda" if precision != "fp32" and torch.cuda.is_available() else "cpu"
            networks = converted(model, precision, device)
        module = graph_module(name, model.config, *networks)
        logger.info("exporting %s (%s, opset %d)", path, precision, opset)
        if progress is not None:
            progress(f"{name}: exporting {precision} graph (opset {opset})"
                     + (" and checking it with onnxruntime" if check else ""))
        proto = export_graph(module, graph_spec(name, model.config), opset)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: _save(proto, tmp))
        write_manifest(path, key)
        error = check_graph(path, name, model) if check else None
        results.append(ExportResult(name, path, exported=True, error=error))
    return results


def _require(*modules: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise EngineError(f"ONNX export needs {' and '.join(missing)}: pip install "
                          f"{' '.join(missing)} (or the bsldm-fast[onnx] extra)")


def _save(proto, path: str) -> None:
    import onnx

    # One protobuf holds at most 2 GiB; the paper U-Net in float32 is 1.5 GiB.
    if proto.ByteSize() >= 1 << 31:
        raise EngineError(f"the graph is {proto.ByteSize() / 2**30:.1f} GiB, over ONNX's 2 GiB limit")
    onnx.save_model(proto, path)
