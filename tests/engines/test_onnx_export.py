"""ONNX graphs run by onnxruntime on the CPU against the PyTorch reference path, and their form."""

import collections
import dataclasses
import os

import numpy as np
import onnx
import pytest
import torch

from bsldm_fast.engines.graphs import GRAPH_NAMES, graph_module, graph_spec
from bsldm_fast.engines.onnx_export import (BF16_OPSET, CHECK_TOLERANCE, check_graph, converted,
                                            export_graph, fold_constants, onnxruntime_outputs,
                                            relative_error, torch_reference)
from bsldm_fast.models.unet import AttentionBlock
from bsldm_fast.modeldir import random_model

_cache = {}


def exported(config: str, graph: str, precision: str = "fp32", seed: int = 11, **config_changes):
    """Export once per session (tracing is the slow part); each test draws its own inputs."""
    key = (config, graph, precision, seed, tuple(sorted(config_changes.items())))
    if key not in _cache:
        model = random_model(config, seed=seed)
        if config_changes:
            diffusion = dataclasses.replace(model.config.diffusion, **config_changes)
            model.config = model.config.replace(diffusion=diffusion)
        vqgan, unet = converted(model, precision)
        opset = BF16_OPSET if precision == "bf16" else 17
        proto = export_graph(graph_module(graph, model.config, vqgan, unet),
                             graph_spec(graph, model.config), opset)
        _cache[key] = (model, proto)
    return _cache[key]


@pytest.mark.parametrize("graph", GRAPH_NAMES)
@pytest.mark.parametrize("batch", [1, 3])
def test_tiny_graphs_match_pytorch(graph, batch, gen):
    model, proto = exported("tiny", graph)
    onnx.checker.check_model(proto, full_check=True)
    assert {op.domain for op in proto.opset_import} == {""}  # standard ops only
    assert proto.opset_import[0].version == 17
    error = check_graph(proto, graph, model, batch=batch, generator=gen)
    assert error <= CHECK_TOLERANCE


def test_newer_opsets_match_pytorch(gen):
    """Opset 22 (bf16's) is reached from torch's opset 20 with onnx's version converter."""
    model = random_model("tiny", seed=11)
    proto = export_graph(graph_module("unet", model.config, model.vqgan, model.unet),
                         graph_spec("unet", model.config), opset=22)
    assert proto.opset_import[0].version == 22
    assert check_graph(proto, "unet", model, batch=2, generator=gen) <= CHECK_TOLERANCE


def test_small_unet_matches_pytorch(gen):
    model, proto = exported("small", "unet")
    assert check_graph(proto, "unet", model, batch=2, generator=gen) <= CHECK_TOLERANCE


def test_original_condition_scaling_is_inside_the_unet_graph(gen):
    model, proto = exported("tiny", "unet", condition_scaling="original")
    assert check_graph(proto, "unet", model, batch=2, generator=gen) <= CHECK_TOLERANCE
    # The scaling matters: the plain graph gives a different answer on the same inputs.
    plain_model, plain = exported("tiny", "unet")
    feeds = graph_spec("unet", model.config).sample_inputs(2, gen)
    feeds["t"] = torch.tensor([100, 900])
    assert relative_error(onnxruntime_outputs(proto, feeds), onnxruntime_outputs(plain, feeds)) > 1e-3


def _producer(proto):
    return {out: node for node in proto.graph.node for out in node.output}


def _constant(proto, name):
    for init in proto.graph.initializer:
        if init.name == name:
            return onnx.numpy_helper.to_array(init)
    return None


def attention_patterns(proto):
    """(q scale, k scale) of every Mul -> MatMul -> Softmax -> MatMul chain with constant scales."""
    producer = _producer(proto)
    consumers = collections.defaultdict(list)
    for node in proto.graph.node:
        for name in node.input:
            consumers[name].append(node)
    found = []
    for softmax in (n for n in proto.graph.node if n.op_type == "Softmax"):
        first = producer.get(softmax.input[0])
        after = consumers[softmax.output[0]]
        if first is None or first.op_type != "MatMul" or [n.op_type for n in after] != ["MatMul"]:
            continue
        scales = []
        for operand in first.input:
            mul = producer.get(operand)
            if mul is None or mul.op_type != "Mul":
                break
            values = [_constant(proto, name) for name in mul.input]
            constant = [v for v in values if v is not None and v.size == 1]
            if len(constant) != 1:
                break
            scales.append(float(constant[0].reshape(())))
        if len(scales) == 2:
            found.append(tuple(scales))
    return found


@pytest.mark.parametrize("config", ["tiny", "small"])
def test_attention_exports_in_the_form_tensorrt_fuses(config):
    model, proto = exported(config, "unet")
    blocks = [m for m in model.unet.modules() if isinstance(m, AttentionBlock)]
    patterns = attention_patterns(proto)
    assert len(patterns) == len(blocks) > 0
    # Q and K each scaled by head_dim**-0.25 before the first matmul (TensorRT's requirement).
    expected = sorted(((b.qkv.out_channels // 3) // b.num_heads) ** -0.25 for b in blocks)
    assert sorted(q for q, _ in patterns) == pytest.approx(expected, rel=1e-6)
    assert all(q == pytest.approx(k, rel=1e-6) for q, k in patterns)
    # The head-size arithmetic was folded away: no Sqrt is left in the graph.
    assert not any(n.op_type == "Sqrt" for n in proto.graph.node)


def _elem_types(proto):
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    types.update({init.name: init.data_type for init in proto.graph.initializer})
    return types


@pytest.mark.parametrize("precision, dtype", [("fp16", onnx.TensorProto.FLOAT16),
                                              ("bf16", onnx.TensorProto.BFLOAT16)])
def test_reduced_precision_unet_keeps_groupnorm_in_float32(precision, dtype):
    model, proto = exported("tiny", "unet", precision)
    onnx.checker.check_model(proto, full_check=True)
    types = _elem_types(proto)
    norms = [n for n in proto.graph.node if n.op_type == "InstanceNormalization"]
    groupnorms = sum(isinstance(m, torch.nn.GroupNorm) for m in model.unet.modules())
    assert len(norms) == groupnorms
    assert all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in norms)
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert convs and all(types[n.input[1]] == dtype for n in convs)
    # The interface stays float32 in and out.
    assert [i.type.tensor_type.elem_type for i in proto.graph.input] == [onnx.TensorProto.FLOAT,
                                                                         onnx.TensorProto.INT64]
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_fp16_graphs_run_close_to_the_fp16_pytorch_networks(gen):
    """onnxruntime has fp16 CPU kernels (not bf16): compare with PyTorch in the same precision."""
    for graph in GRAPH_NAMES:
        model, proto = exported("tiny", graph, "fp16")
        feeds = graph_spec(graph, model.config).sample_inputs(2, gen)
        vqgan, unet = converted(model, "fp16")
        with torch.no_grad():
            expected = graph_module(graph, model.config, vqgan, unet)(*feeds.values()).numpy()
        reference32 = torch_reference(graph, model, feeds).numpy()
        actual = onnxruntime_outputs(proto, feeds)
        fp16_error = relative_error(expected, reference32)
        # flash-attention's rule: no worse than twice PyTorch's own fp16 error, plus a margin.
        assert relative_error(actual, reference32) <= 2 * fp16_error + 1e-3


def test_fold_constants_keeps_the_function_and_the_dynamic_batch(gen):
    from onnx import helper

    # y = x * (shape(x)[1] ** -0.5) with x of shape [batch, 4]: the scale folds, the batch stays.
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4])
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Constant", [], ["one"], value=helper.make_tensor("", 7, [1], [1])),
        helper.make_node("Gather", ["s", "one"], ["d"], axis=0),
        helper.make_node("Cast", ["d"], ["df"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Constant", [], ["p"], value=helper.make_tensor("", 1, [], [-0.5])),
        helper.make_node("Pow", ["df", "p"], ["scale"]),
        helper.make_node("Mul", ["x", "scale"], ["y"]),
    ]
    proto = helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    folded = fold_constants(proto)
    assert [n.op_type for n in folded.graph.node] == ["Mul"]
    for batch in (1, 5):
        data = torch.randn(batch, 4, generator=gen)
        out = onnxruntime_outputs(folded, {"x": data})
        np.testing.assert_allclose(out, data.numpy() * 0.5, rtol=1e-6)


@pytest.mark.skipif(os.environ.get("BSLDM_FAST_SLOW") != "1",
                    reason="the paper-size export check takes minutes; set BSLDM_FAST_SLOW=1")
@pytest.mark.parametrize("graph", GRAPH_NAMES)
def test_paper_graphs_match_pytorch(graph, gen):
    model, proto = exported("paper", graph)
    assert check_graph(proto, graph, model, batch=1, generator=gen) <= CHECK_TOLERANCE
