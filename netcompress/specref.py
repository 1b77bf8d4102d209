"""The spec reference (Markdown), generated from the techniques' pydantic models.

``netcompress spec-reference`` prints it; ``--write README.md`` replaces the block between the markers
below, so the README cannot drift from the code (a test checks it).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

START, END = "<!-- spec-reference:start -->", "<!-- spec-reference:end -->"


def _type(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation).replace("typing.", "")
    text = re.sub(r"Literal\[(.*?)\]", lambda m: " \\| ".join(x.strip().strip("'\"") for x in m.group(1).split(",")),
                  text)
    text = re.sub(r"compression\.[\w.]+\.", "", text).replace("NoneType", "None").replace("|", "\\|")
    return text.replace("\\\\|", "\\|")


def _constraints(info: FieldInfo) -> str:
    out = []
    for m in info.metadata:
        for attr, sym in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"), ("min_length", "min len"),
                          ("max_length", "max len")):
            v = getattr(m, attr, None)
            if v is not None:
                out.append(f"{sym} {v}")
    return ", ".join(out)


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    if info.default_factory is not None:
        try:
            value = info.default_factory()
        except TypeError:
            return "(computed)"
        return f"`{value.model_dump() if isinstance(value, BaseModel) else value}`"
    return f"`{info.default}`"


def model_table(model: type[BaseModel]) -> list[str]:
    lines = ["| field | type | default | bounds | description |", "|---|---|---|---|---|"]
    for name, info in model.model_fields.items():
        if name == "method":
            continue
        desc = (info.description or "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{name}` | {_type(info.annotation)} | {_default(info)} | {_constraints(info)} | {desc} |")
    return lines


def render() -> str:
    """The whole reference: top level, ``eval``, ``finetune``, then every registered technique."""
    from compression.registry import get_technique, list_techniques
    from compression.spec import BudgetSpec, EvalSpec, FinetuneSpec, TargetSpec

    out = ["A spec is `{\"steps\": [step, ...], \"eval\": {...}}` (JSON over REST, YAML or JSON in the CLI); "
           "each step's `method` picks its technique. Unknown fields are refused (422 with the JSON path).", "",
           "#### `eval`", "", *model_table(EvalSpec), "",
           "#### `finetune` (inside a step)", "", *model_table(FinetuneSpec), "",
           "#### `target`, `search`, `budget` (a search job)", "",
           "`search` maps `<method>.<field>`, `<scheme>.<field>` (e.g. `cluster.bits`) or `steps[i].<field>` to a "
           "list of values, or is `\"auto\"`; `prune.allocation: [uniform, sensitivity]` lets a per-layer "
           "sensitivity scan set each layer's sparsity. A `target` alone searches `auto`. The job keeps every "
           "candidate's metrics, publishes the best one meeting the target as `model.onnx`, each Pareto-front "
           "member as `front-<k>-<id>.onnx` and the front as `pareto.svg`; a cancel or time-out ends it "
           "`succeeded` with the best so far (`metrics.search.partial`), and a retried job resumes after the "
           "last finished candidate.", "",
           "`target`:", "", *model_table(TargetSpec), "", "`budget`:", "", *model_table(BudgetSpec), ""]
    for name in list_techniques():
        tech = get_technique(name)
        out += [f"#### `method: {name}` — {tech.summary}", "", *model_table(tech.spec_model), ""]
    return "\n".join(out).rstrip() + "\n"


def write_into(path: Path) -> bool:
    """Replace the marked block of ``path``; returns whether the file changed."""
    text = path.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{path} has no {START} … {END} block")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{render()}{END}{tail}"
    if new != text:
        path.write_text(new)
    return new != text


def current_block(path: Path) -> str:
    text = path.read_text()
    return text.split(START, 1)[1].split(END, 1)[0].lstrip("\n")
