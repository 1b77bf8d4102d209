"""Control flow: ``If`` (both branches are compiled at conversion time; the condition picks one).

The condition is read as a Python bool, so the chosen branch depends on data exactly as in ONNX
Runtime; gradients flow through whichever branch ran. Values a branch reads from the enclosing
scope were appended to the node's inputs at conversion (``extra["outer_refs"]``). Loop/Scan are
not supported.
"""

from __future__ import annotations

from .ops import register_op


@register_op("If")
def _if(m, node, xs):
    cond = bool(xs[0].reshape(-1)[0].item())
    branch = node.attr("then_branch") if cond else node.attr("else_branch")
    n_own = len(node.inputs) - len(node.extra["outer_refs"])
    scope = dict(zip(node.extra["outer_refs"], xs[n_own:], strict=True))
    return m.run_subgraph(branch, scope)
