"""GroupNorm for OpenVINO's CPU plugin as per-channel statistics and one scale-and-shift.

The ONNX exporter writes GroupNorm(G) of x [N, C, *S] (S: H, W in the convolutions' blocks, H*W in
the attention blocks) as Reshape [N, G, C/G*|S|] -> InstanceNormalization (OpenVINO: MVN over the
last axis, times and plus per-group constants) -> Reshape back to [N, C, *S] -> Mul gamma -> Add
beta. The 3-D reshapes force the plain layout on
the MVN, while the convolutions around it run in blocked or channels-last layouts, so the CPU
plugin puts a layout reorder on each side of every GroupNorm. On the paper U-Net under the bf16
hint (AMD EPYC, OpenVINO 2026.4) those reorders were 12 % of the step.

`rewrite_group_norms` replaces each such chain with the same function in ops on x's own shape,
which run in any layout:

    mean_c = ReduceMean(x, S);           mean_g = its mean over each group's channels
    d      = x - mean_g                  (broadcast back to the group's channels)
    var_g  = mean over the group of ReduceL2(d, S)^2 / |S|
    y      = d * (A_c / sqrt(var_g + eps)) + B_c

where A_c = gamma_c * a_g and B_c = beta_c + gamma_c * b_g fold the per-group constants (a_g, b_g)
and the affine parameters into per-channel constants.

NOTE: why two passes (subtract the mean, then ReduceL2) and not var = E[x^2] - mean^2: under the
bf16 hint the reductions' outputs are rounded to bf16, and on the bundled model's trained U-Net
mean^2/var per group reaches 193 (real radiographs and phantoms through the sampler), where E[x^2]
rounded to 8 bits cancels to a variance off by tens of percent. Measured on its U-Net against fp32
PyTorch (20 inputs, max error): E[x^2] - mean^2 1.5e-1, two passes 7.6e-2, the exporter's chain
7.4e-2. The mean itself is rounded to bf16 as well, which shifts a group by up to 2^-9 |mean|, as
large as the rounding of x itself; subtracting the residual mean in a third pass measured closer to
the exporter's chain on synthetic groups with |mean| = 30 std (1.0-1.3x its error instead of
1.2-1.45x) but took half of the rewrite's gain, so it is not done.

The int8 IRs are not rewritten: the quality gate measured them as they are, and on this CPU the
rewrite does not make the int8 U-Net faster (its element-wise kernels run in the plain layout
either way, beside channels-last int8 convolutions).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import openvino

NAME_SUFFIX = "/group_norm_statistics"
"""Appended to the friendly names of the nodes a rewrite adds (to find them in a runtime model)."""


def _constant(output) -> np.ndarray | None:
    node = output.get_node()
    return node.get_data() if node.get_type_name() == "Constant" else None


def _only_consumer(output):
    targets = list(output.get_target_inputs())
    return targets[0].get_node() if len(targets) == 1 else None


def _match(mvn):
    """(x, G, eps, a_g, b_g, gamma_c, beta_c, last Add) of the exporter's GroupNorm chain ending in
    `mvn`'s consumers, or None when `mvn` is not one (then it is left as it is)."""
    attributes = mvn.get_attributes()
    if not attributes["normalize_variance"] or attributes["eps_mode"].upper() != "INSIDE_SQRT":
        return None
    reshape_in = mvn.input(0).get_source_output().get_node()
    if reshape_in.get_type_name() != "Reshape":
        return None
    x = reshape_in.input(0).get_source_output()
    shape, grouped = x.get_partial_shape(), mvn.output(0).get_partial_shape()
    if not (shape.is_static and grouped.is_static and len(shape) >= 3 and len(grouped) == 3):
        return None
    axes = _constant(mvn.input(1).get_source_output())
    if axes is None or [int(a) for a in axes.reshape(-1)] not in ([2], [-1]):
        return None
    channels, groups = shape[1].get_length(), grouped[1].get_length()
    if channels % groups:
        return None
    a_g, b_g = np.ones(groups, np.float64), np.zeros(groups, np.float64)
    node = _only_consumer(mvn.output(0))
    for kind in ("Multiply", "Add"):  # the InstanceNormalization's own scale and bias, per group
        if node is not None and node.get_type_name() == kind:
            value = _constant(node.input(1).get_source_output())
            if value is None or value.size not in (1, groups):
                return None
            if kind == "Multiply":
                a_g = a_g * np.broadcast_to(value.reshape(-1), (groups,))
            else:
                b_g = b_g + np.broadcast_to(value.reshape(-1), (groups,))
            node = _only_consumer(node.output(0))
    if node is None or node.get_type_name() != "Reshape" or node.output(0).get_partial_shape() != shape:
        return None
    multiply = _only_consumer(node.output(0))
    if multiply is None or multiply.get_type_name() != "Multiply":
        return None
    add = _only_consumer(multiply.output(0))
    if add is None or add.get_type_name() != "Add":
        return None
    gamma = _constant(multiply.input(1).get_source_output())
    beta = _constant(add.input(1).get_source_output())
    if gamma is None or beta is None or gamma.size not in (1, channels) or beta.size not in (1, channels):
        return None
    gamma = np.broadcast_to(gamma.reshape(-1), (channels,)).astype(np.float64)
    beta = np.broadcast_to(beta.reshape(-1), (channels,)).astype(np.float64)
    return x, groups, float(attributes["eps"]), a_g, b_g, gamma, beta, add


def _statistics(x, groups: int, eps: float, a_g, b_g, gamma, beta, name: str):
    """The rewritten GroupNorm of `x` (see the module docstring), its nodes named under `name`."""
    from openvino import opset13 as ops

    n, channels, *sizes = (d.get_length() for d in x.get_partial_shape())
    per_group, rank = channels // groups, 2 + len(sizes)
    spatial = ops.constant(np.arange(2, rank, dtype=np.int64))
    by_group = ops.constant(np.array([n, groups, per_group], np.int64))
    by_channel = ops.constant(np.array([n, channels] + [1] * len(sizes), np.int64))
    channel_shape = (1, channels) + (1,) * len(sizes)
    within_group = ops.constant(np.array([2], np.int64))
    spread = ops.constant(np.ones((1, 1, per_group), np.float32))
    scale_c = ops.constant((gamma * np.repeat(a_g, per_group)).astype(np.float32).reshape(channel_shape))
    shift_c = ops.constant((beta + gamma * np.repeat(b_g, per_group)).astype(np.float32).reshape(channel_shape))
    added = []

    def node(made):
        added.append(made)
        return made

    def group_mean(per_channel):  # [N, C, 1...] -> [N, G, 1]
        return node(ops.reduce_mean(node(ops.reshape(per_channel, by_group, False)), within_group, True))

    def to_channels(per_group_value):  # [N, G, 1] -> [N, C, 1...]
        return node(ops.reshape(node(ops.multiply(per_group_value, spread)), by_channel, False))

    mean = to_channels(group_mean(node(ops.reduce_mean(x, spatial, True))))
    centred = node(ops.subtract(x, mean))
    norm = node(ops.reduce_l2(centred, spatial, True))
    mean_square = node(ops.multiply(node(ops.multiply(norm, norm)),
                                    ops.constant(np.float32(1.0 / int(np.prod(sizes))))))
    inverse_std = node(ops.power(node(ops.add(group_mean(mean_square), ops.constant(np.float32(eps)))),
                                 ops.constant(np.float32(-0.5))))
    scale = node(ops.multiply(to_channels(inverse_std), scale_c))
    out = node(ops.add(node(ops.multiply(centred, scale)), shift_c))
    for i, made in enumerate(added):
        made.set_friendly_name(f"{name}{NAME_SUFFIX}/{i}")
    return out


def rewrite_group_norms(model: "openvino.Model") -> int:
    """Rewrite every exporter GroupNorm chain of `model` (static shapes) in place; the count.

    Constant folding runs first (on a model with an MVN at all), so that a reshape whose target
    shape the exporter computes from ShapeOf (static once the model is reshaped) reads as a constant."""
    from openvino.passes import ConstantFolding, Manager

    if not any(op.get_type_name() == "MVN" for op in model.get_ordered_ops()):
        return 0
    manager = Manager()
    manager.register_pass(ConstantFolding())
    manager.run_passes(model)
    count = 0
    for mvn in [op for op in model.get_ordered_ops() if op.get_type_name() == "MVN"]:
        matched = _match(mvn)
        if matched is None:
            continue
        x, groups, eps, a_g, b_g, gamma, beta, add = matched
        out = _statistics(x, groups, eps, a_g, b_g, gamma, beta, add.get_friendly_name())
        add.output(0).replace(out.output(0))
        count += 1
    if count:
        model.validate_nodes_and_infer_types()
    return count
