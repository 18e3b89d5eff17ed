"""Lower `msssm::SelectiveScan` placeholder nodes (see msssm_serve/selective.py) to standard ONNX Scan nodes.

The body is one step of the selective SSM for all streams of the batch:
    h = exp(dt_t * A) * h + (dt_t * x_t) * B_t ;  y_t = sum_N(h * C_t)
Inputs keep the batch-first layout: the Scan iterates over axis 1 of x, dt, B, C and stacks y along axis 1, so no
transposes are needed. A is read from the outer scope, as ONNX allows for subgraphs.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

PLACEHOLDER = ("msssm", "SelectiveScan")


def _step_body(a_name: str, prefix: str) -> onnx.GraphProto:
    n = lambda name: f"{prefix}{name}"  # noqa: E731  names unique per Scan, for readable graphs
    unknown = lambda name, rank: helper.make_tensor_value_info(n(name), TensorProto.FLOAT, [None] * rank)  # noqa: E731
    last_axis = helper.make_tensor(n("last_axis"), TensorProto.INT64, [1], [-1])
    nodes = [
        helper.make_node("Constant", [], [n("axis")], value=last_axis),
        helper.make_node("Unsqueeze", [n("dt_t"), n("axis")], [n("dt_col")]),  # [Bt, M, D, 1]
        helper.make_node("Unsqueeze", [n("x_t"), n("axis")], [n("x_col")]),
        helper.make_node("Mul", [n("dt_col"), a_name], [n("dA")]),
        helper.make_node("Exp", [n("dA")], [n("decay")]),
        helper.make_node("Mul", [n("dt_col"), n("x_col")], [n("dx")]),
        helper.make_node("Mul", [n("dx"), n("B_t")], [n("drive")]),
        helper.make_node("Mul", [n("decay"), n("h_in")], [n("carried")]),
        helper.make_node("Add", [n("carried"), n("drive")], [n("h_out")]),
        helper.make_node("Mul", [n("h_out"), n("C_t")], [n("hC")]),
        helper.make_node("ReduceSum", [n("hC"), n("axis")], [n("y_t")], keepdims=0),
    ]
    return helper.make_graph(
        nodes,
        f"{prefix}step",
        inputs=[unknown("h_in", 4), unknown("x_t", 3), unknown("dt_t", 3), unknown("B_t", 4), unknown("C_t", 4)],
        outputs=[unknown("h_out", 4), unknown("y_t", 3)],
    )


def lower_selective_scans(model: onnx.ModelProto) -> int:
    """Replace every placeholder in the main graph by a Scan, in place; -> how many were lowered."""
    graph = model.graph
    lowered = 0
    for node in list(graph.node):
        if (node.domain, node.op_type) != PLACEHOLDER:
            continue
        x, dt, a, b, c, h0 = node.input
        y, h_last = node.output
        scan = helper.make_node(
            "Scan",
            [h0, x, dt, b, c],
            [h_last, y],
            name=f"selective_scan_{lowered}",
            num_scan_inputs=4,
            scan_input_axes=[1, 1, 1, 1],
            scan_output_axes=[1],
            body=_step_body(a, f"scan{lowered}_"),
        )
        position = list(graph.node).index(node)
        graph.node.remove(node)
        graph.node.insert(position, scan)
        lowered += 1
    kept = [op for op in model.opset_import if op.domain != PLACEHOLDER[0]]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return lowered
