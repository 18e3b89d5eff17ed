"""Lower `msssm::SelectiveScan` placeholder nodes (see msssm_serve/selective.py) to standard ONNX ops and one Scan.

    h_t = exp(dt_t * A) * h_t-1 + (dt_t * x_t) * B_t ;  y_t = sum_N(h_t * C_t)

Why it is laid out this way (measured with onnxruntime 1.32 on the CPU provider, one thread):
  * onnxruntime pays a fixed cost per op per Scan iteration, which dominates when a call has few rows (one
    /classify window: 1,280 state floats per step), so only what must be sequential runs inside the Scan: the body
    is `h = decay_t * h + drive_t` (and an Identity that hands each h_t out). The decay (Mul, Exp), the drive (the
    outer product dt x B) and the read-out (Mul by C, sum over N) are computed for all time steps at once outside,
    each one large vectorised op instead of T small ones. Against the earlier body that formed the drive and the
    read-out per step (5 ops; identical outputs), per sample: one window alone 0.89-0.91, 4 x 125 0.96, 16-20
    streams x 25 0.97-0.98 (within noise), 64-256 x 25 1.05-1.12 (no CPU call is that large: the runtime cuts them
    at ~512 samples), from `python benchmarks/runtime.py --threads 1 --against OLD_MODEL_DIR --rounds 15`.
    Several steps per iteration (Split, k steps, Concat) were slower than this body at every shape measured.
  * The Scan walks axis 0 of time-major tensors: scanning axis 1 makes onnxruntime transpose every input and output
    of the loop, which costs more than the loop itself at large batch.
  * Inside the loop the state is [Bt, M, N, D] (D = channels innermost): the broadcasts over N and the reduction
    over N then run over contiguous rows of D, while [.., D, N] with N = 4 innermost falls back to slow broadcasts.
Only the small per-step tensors (x, dt: D per scale; B, C: N per scale) are transposed, and the state once per call.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

PLACEHOLDER = ("msssm", "SelectiveScan")


def _step_body(prefix: str) -> onnx.GraphProto:
    """One step for all streams: state [Bt, M, N, D] and per-step decay and drive [Bt, M, N, D] -> (new state, the
    same state again as the step's scan output h_t)."""
    n = lambda name: f"{prefix}{name}"  # noqa: E731  names unique per Scan, for readable graphs
    unknown = lambda name: helper.make_tensor_value_info(n(name), TensorProto.FLOAT, [None] * 4)  # noqa: E731
    nodes = [
        helper.make_node("Mul", [n("decay_t"), n("h_in")], [n("carried")]),
        helper.make_node("Add", [n("carried"), n("drive_t")], [n("h_out")]),
        # a graph output may not be listed twice: onnxruntime then hands out wrong values for one of them
        helper.make_node("Identity", [n("h_out")], [n("h_t")]),
    ]
    return helper.make_graph(nodes, f"{prefix}step", inputs=[unknown("h_in"), unknown("decay_t"), unknown("drive_t")],
                             outputs=[unknown("h_out"), unknown("h_t")])


def _lowered_nodes(node: onnx.NodeProto, prefix: str) -> list[onnx.NodeProto]:
    x, dt, a, b, c, h0 = node.input
    y, h_last = node.output
    n = lambda name: f"{prefix}{name}"  # noqa: E731
    axis3 = helper.make_tensor(n("axis3"), TensorProto.INT64, [1], [3])
    time_major = [1, 0, 2, 3]  # [Bt, L, M, D] -> [L, Bt, M, D]
    nodes = [
        helper.make_node("Constant", [], [n("axis3_c")], value=axis3),
        helper.make_node("Transpose", [x], [n("x_tm")], perm=time_major),
        helper.make_node("Transpose", [dt], [n("dt_tm")], perm=time_major),
        helper.make_node("Unsqueeze", [n("dt_tm"), n("axis3_c")], [n("dt_col")]),  # [L, Bt, M, 1, D]
        helper.make_node("Transpose", [a], [n("A_nd")], perm=[0, 2, 1]),  # [M, D, N] -> [M, N, D]
        helper.make_node("Mul", [n("dt_col"), n("A_nd")], [n("dA")]),  # [L, Bt, M, N, D]
        helper.make_node("Exp", [n("dA")], [n("decay")]),
        # B, C [Bt|1, L, M, D|1, N] -> [L, Bt|1, M, N, D|1]
        helper.make_node("Transpose", [b], [n("B_tm")], perm=[1, 0, 2, 4, 3]),
        helper.make_node("Transpose", [c], [n("C_tm")], perm=[1, 0, 2, 4, 3]),
        helper.make_node("Mul", [n("dt_tm"), n("x_tm")], [n("dx")]),
        helper.make_node("Unsqueeze", [n("dx"), n("axis3_c")], [n("dx_col")]),  # [L, Bt, M, 1, D]
        helper.make_node("Mul", [n("dx_col"), n("B_tm")], [n("drive")]),  # [L, Bt, M, N, D]
        helper.make_node("Transpose", [h0], [n("h0_nd")], perm=[0, 1, 3, 2]),  # [Bt, M, D, N] -> [Bt, M, N, D]
        helper.make_node(
            "Scan",
            [n("h0_nd"), n("decay"), n("drive")],
            [n("h_last_nd"), n("h_tm")],  # h_tm: every step's state, [L, Bt, M, N, D]
            name=f"{prefix}scan",
            num_scan_inputs=2,
            body=_step_body(f"{prefix}step_"),
        ),
        helper.make_node("Mul", [n("h_tm"), n("C_tm")], [n("hC")]),
        helper.make_node("ReduceSum", [n("hC"), n("axis3_c")], [n("y_tm")], keepdims=0),  # sum over N: [L, Bt, M, D]
        helper.make_node("Transpose", [n("h_last_nd")], [h_last], perm=[0, 1, 3, 2]),
        helper.make_node("Transpose", [n("y_tm")], [y], perm=time_major),
    ]
    return nodes


def _replace_node(graph: onnx.GraphProto, node: onnx.NodeProto, new_nodes: list[onnx.NodeProto]) -> None:
    """Put `new_nodes` where `node` was, keeping the graph's topological order."""
    position = list(graph.node).index(node)
    graph.node.remove(node)
    for offset, new in enumerate(new_nodes):
        graph.node.insert(position + offset, new)


def lower_selective_scans(model: onnx.ModelProto) -> int:
    """Replace every placeholder in the main graph by its lowered ops, in place; -> how many were lowered."""
    graph = model.graph
    lowered = 0
    for node in list(graph.node):
        if (node.domain, node.op_type) != PLACEHOLDER:
            continue
        _replace_node(graph, node, _lowered_nodes(node, f"ssm{lowered}_"))
        lowered += 1
    kept = [op for op in model.opset_import if op.domain != PLACEHOLDER[0]]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return lowered


def expand_softplus(model: onnx.ModelProto) -> int:
    """Replace each Softplus by relu(x) + log(1 + exp(-|x|)), in place; -> how many.

    The same function to float32 rounding, stable for any x, and 3x faster under onnxruntime's CPU provider, whose
    Softplus kernel is scalar (9 ns per element here, the largest single cost of the graph before this rewrite)."""
    graph = model.graph
    one = "softplus_one"
    expanded = 0
    for node in list(graph.node):
        if node.op_type != "Softplus" or node.domain not in ("", "ai.onnx"):
            continue
        (x,), (y,) = node.input, node.output
        n = lambda name: f"softplus{expanded}_{name}"  # noqa: E731
        _replace_node(graph, node, [
            helper.make_node("Abs", [x], [n("abs")]),
            helper.make_node("Neg", [n("abs")], [n("neg")]),
            helper.make_node("Exp", [n("neg")], [n("exp")]),
            helper.make_node("Add", [n("exp"), one], [n("one_plus")]),
            helper.make_node("Log", [n("one_plus")], [n("log")]),
            helper.make_node("Relu", [x], [n("relu")]),
            helper.make_node("Add", [n("relu"), n("log")], [y]),
        ])
        expanded += 1
    if expanded:
        graph.initializer.append(helper.make_tensor(one, TensorProto.FLOAT, [], [1.0]))
    return expanded
