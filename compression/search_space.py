"""What a search explores: the ``target``, ``search`` and ``budget`` sections of a spec, and the candidates.

A search key names a step field as ``<selector>.<field>``: the selector is a method (``prune``), a
quantize scheme (``cluster`` — applies only to quantize steps using that scheme in the candidate) or a
step index (``steps[1]``). Values are lists. The grid is the product of every key's values, at most
MAX_CANDIDATES points; candidates that come out identical (``cluster.bits`` on an ``int8`` candidate) are
kept once.

``prune.allocation: [uniform, sensitivity]`` is the one pseudo-field: ``sensitivity`` gives each layer its
own sparsity from a quick per-layer scan (the search fills ``scope: layer`` and ``layers`` in), so layers
that barely affect the output are pruned harder and the fragile ones are spared. What it means, where it
applies and which values it takes is pruning's knowledge (:mod:`compression.techniques.pruning.sensitivity`),
imported where it is used: that package imports :mod:`compression.spec`, which imports this module.
What ``search: auto`` tries for a step is its spec model's to say (``StepSpec.auto_grid``).

Example:
    >>> space = SearchSpace.model_validate({"prune.sparsity": [0.5, 0.9]})       # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from pydantic import Field, ValidationError

from compression.errors import InvalidSpec
from compression.step_spec import StrictModel

ALLOCATION = "allocation"
MAX_CANDIDATES = 512
MAX_VALUES = 32
_KEY = re.compile(r"^(?:(?P<method>[a-z_][a-z0-9_]*)|steps\[(?P<index>\d+)\])\.(?P<field>[a-z_][a-z0-9_.]*)$")

class TargetSpec(StrictModel):
    """What "good enough" and "better" mean for a search.

    ``accuracy``, ``agreement`` and ``output_cosine`` fall by a difference (``max_accuracy_drop``); a language
    model's ``perplexity`` rises by a factor (``max_perplexity_ratio``, the sense of the gate's
    ``eval.max_perplexity_ratio``). A candidate's ``drop`` is one number either way, smaller is better, so the
    front and the ranking need no second case: the metric's fall, or the perplexity's relative rise
    ``model / original − 1`` (:meth:`allowed_drop` is the target's bound on it).
    """

    max_accuracy_drop: float = Field(0.01, ge=0.0, le=1.0,
                                     description="the most the metric may fall below the original's (absolute); "
                                                 "not for perplexity")
    max_perplexity_ratio: float = Field(1.10, ge=1.0, le=1000.0,
                                        description="metric perplexity: the most a candidate's perplexity may be, as a "
                                                    "multiple of the original's")
    metric: Literal["accuracy", "agreement", "output_cosine", "perplexity"] = Field(
        "accuracy", description="accuracy needs labels; agreement (top-1 vs the original) and output_cosine do not; "
                                "perplexity needs a language model (logits [N, T, vocab] on ids [N, T])")
    optimize: Literal["latency", "file_bytes", "compressed_bytes", "macs", "params"] = Field(
        "file_bytes", description="what the best candidate minimises among those meeting the target")

    def allowed_drop(self) -> float:
        """The most a candidate's ``drop`` may be: ``max_accuracy_drop``, or ``max_perplexity_ratio − 1``."""
        return self.max_perplexity_ratio - 1.0 if self.metric == "perplexity" else self.max_accuracy_drop


class BudgetSpec(StrictModel):
    """When the search stops; whichever comes first. The best candidate so far is kept (``partial``)."""

    minutes: float = Field(30.0, gt=0, le=24 * 60, description="then the candidate in flight is dropped and the search "
                                                               "ends (the first candidate always finishes)")
    trials: int = Field(24, ge=1, le=MAX_CANDIDATES, description="candidates tried at most")


@dataclass
class Candidate:
    """One point of the grid: its steps (raw dicts, validated), the searched values, a stable id.

    ``steps`` dicts are shared between candidates (a step no searched key touches is validated once, not
    once per candidate, and sections a searched key leaves alone are shared too): treat them as read-only.
    """

    steps: list[dict[str, Any]]
    values: dict[str, Any]
    sensitivity_steps: list[int] = field(default_factory=list)  # prune steps to allocate per layer
    cost: float = 1.0
    data_steps: list[int] = field(default_factory=list)  # steps that need a dataset (train, calibrate)
    digests: list[str] = field(default_factory=list)  # one per step, see step_digest

    @property
    def id(self) -> str:
        """Hash of the steps' digests and the sensitivity steps: O(steps), not O(spec size), per candidate."""
        digests = self.digests or [step_digest(s) for s in self.steps]
        blob = json.dumps({"steps": digests, "sens": self.sensitivity_steps})
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def step_digest(step: dict[str, Any]) -> str:
    """A stable hash of one validated step (key order does not matter)."""
    return hashlib.sha256(json.dumps(step, sort_keys=True).encode()).hexdigest()


def _selector_matches(step: dict[str, Any], method: str | None, index: int | None, i: int) -> bool:
    if index is not None:
        return index == i
    if method == step.get("method"):
        return True
    return step.get("method") == "quantize" and step.get("scheme", "int8") == method


def quant_schemes() -> tuple[str, ...]:
    """The quantize schemes, which also select search keys (``cluster.bits``): the spec model's ``scheme`` values."""
    from compression.registry import get_technique

    return get_args(get_technique("quantize").spec_model.model_fields["scheme"].annotation)


def validate_search_keys(search: dict[str, list[Any]], steps: list[dict[str, Any]]) -> None:
    """Every key names a step that exists and a field its spec model has; raises InvalidSpec otherwise."""
    from compression.registry import get_technique, list_techniques
    from compression.techniques.pruning.sensitivity import allocation_refusal

    errors = []
    schemes = quant_schemes()
    for key, values in search.items():
        m = _KEY.match(key)
        if not m:
            errors.append({"loc": ["search", key], "msg": "key must be '<method>.<field>', '<scheme>.<field>' "
                                                          "or 'steps[i].<field>'"})
            continue
        if not isinstance(values, list) or not values or len(values) > MAX_VALUES:
            errors.append({"loc": ["search", key], "msg": f"give a list of 1 to {MAX_VALUES} values"})
            continue
        method, index, fld = m["method"], m["index"], m["field"]
        index = int(index) if index is not None else None
        if index is not None and index >= len(steps):
            errors.append({"loc": ["search", key], "msg": f"there is no step {index}"})
            continue
        if method is not None and method not in list_techniques() and method not in schemes:
            errors.append({"loc": ["search", key], "msg": f"unknown method or scheme {method!r}"})
            continue
        targets = [s for i, s in enumerate(steps) if _selector_matches(s, method, index, i)
                   or (method in schemes and s.get("method") == "quantize"
                       and method in search.get("quantize.scheme", []))]
        if not targets:
            errors.append({"loc": ["search", key], "msg": f"no step matches {key.split('.')[0]!r}"})
            continue
        if fld == ALLOCATION:
            refusal = allocation_refusal(targets, values)
            if refusal:
                errors.append({"loc": ["search", key], "msg": refusal})
            continue
        model = get_technique(targets[0]["method"]).spec_model
        if fld.split(".")[0] not in model.model_fields:
            errors.append({"loc": ["search", key], "msg": f"{targets[0]['method']} has no field {fld.split('.')[0]!r}"})
    if errors:
        raise InvalidSpec("invalid search", errors)


def search_model_refs(search: dict[str, list[Any]], steps: list[dict[str, Any]]) -> list[tuple[list[Any], str]]:
    """The model ids inside searched values (``distill.teachers: [["m1"]]``), each with its spec path
    (``["search", "distill.teachers", 0, 0]``): read from the values directly, the grid is never expanded.

    A key's field holds model ids when the spec model of a step it selects says so (``model_ref_fields``).
    Keys that name no step are :func:`validate_search_keys`'s to report; here they hold no ids.

    Example:
        >>> search_model_refs({"steps[0].rewind_model_id": ["m1"]}, [{"method": "prune"}])  # doctest: +SKIP
        [(['search', 'steps[0].rewind_model_id', 0], 'm1')]
    """
    from compression.registry import get_technique, list_techniques

    refs: list[tuple[list[Any], str]] = []
    for key, values in search.items():
        m = _KEY.match(key)
        if m is None or not isinstance(values, list):
            continue
        index = int(m["index"]) if m["index"] is not None else None
        methods = {s.get("method") for i, s in enumerate(steps) if _selector_matches(s, m["method"], index, i)}
        fld = m["field"].split(".")[0]
        for method in sorted(methods & set(list_techniques())):
            spec_model = get_technique(method).spec_model
            for i, value in enumerate(values):
                refs += spec_model.model_ids_in(fld, value, ["search", key, i])
    return refs


def _set(step: dict[str, Any], fld: str, value: Any) -> None:
    """Set ``a.b`` in a step dict (``finetune.epochs``), creating the section when missing.

    Copies each section on the way down: ``step`` is a shallow copy whose sections are shared with the
    user's step and with every other candidate.
    """
    parts = fld.split(".")
    cur = step
    for p in parts[:-1]:
        sub = cur.get(p)
        cur[p] = dict(sub) if isinstance(sub, dict) else {}
        cur = cur[p]
    cur[parts[-1]] = value


def _drop_foreign_options(step: dict[str, Any]) -> None:
    """A searched scheme change (int8 → cluster) drops the options the new scheme does not take (``mode``)."""
    if step.get("method") != "quantize":
        return
    from compression.registry import get_technique

    scheme = step.get("scheme", "int8")
    for opt, schemes in get_technique("quantize").spec_model.OPTION_SCHEMES.items():
        if opt in step and scheme not in schemes:
            del step[opt]


def auto_space(steps: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """The grid ``search: auto`` explores for these steps (by step index, so two prune steps vary alone):
    each step's spec model says what it tries (:meth:`~compression.step_spec.StepSpec.auto_grid`)."""
    from compression.registry import get_technique, list_techniques

    space: dict[str, list[Any]] = {}
    for i, s in enumerate(steps):
        if s.get("method") not in list_techniques():
            continue  # refused by the spec's validation, not here
        for fld, values in get_technique(s["method"]).spec_model.auto_grid(s).items():
            space[f"steps[{i}].{fld}"] = list(values)
    return space


def _step_cost(step: Any) -> float:
    """A rough relative cost: training epochs dominate; calibration and clustering are cheap."""
    epochs = 0.0
    ft = getattr(step, "finetune", None)
    if ft is not None:
        epochs += ft.planned_epochs(None) * getattr(step, "iterations", 1)
    own = getattr(step, "epochs", 0) or 0  # a step that trains itself (distill, early exit, slimmable)
    epochs += step.planned_epochs(None) if own == "auto" else own
    if getattr(step, "mode", None) == "qat":
        epochs += 2
    return 1.0 + epochs


@dataclass
class _Variant:
    """One step as some searched values leave it, validated once however many candidates share it."""

    dump: dict[str, Any]
    digest: str
    cost: float
    needs_data: bool


def expand(steps: list[dict[str, Any]], search: dict[str, list[Any]] | str) -> list[Candidate]:
    """Every distinct candidate of the grid, validated, cheapest first (stable within equal cost).

    The grid's size is checked from the list lengths before anything is expanded, and each distinct
    version of a step is validated once: a large step (a 1,000-entry ``layers`` map) that the search does
    not touch costs its size once, not once per candidate.

    Raises:
        InvalidSpec: a bad key, a value a step refuses (with the searched key in ``loc``), or a grid
            larger than MAX_CANDIDATES.
    """
    from compression.techniques.pruning.sensitivity import allocation_applies

    space = auto_space(steps) if search == "auto" else dict(search)
    if search != "auto":
        validate_search_keys(space, steps)
    size = math.prod(len(v) for v in space.values())  # from the list lengths alone: nothing expanded yet
    if size > MAX_CANDIDATES:
        raise InvalidSpec(f"the search grid has {size} points; at most {MAX_CANDIDATES}",
                          [{"loc": ["search"], "msg": f"grid too large ({size} points, at most {MAX_CANDIDATES})"}])
    # scheme changes first, so a scheme selector (cluster.bits) sees the candidate's scheme
    keys = sorted(space, key=lambda k: (0 if k.endswith(".scheme") else 1, k))
    parsed = []
    for key in keys:
        m = _KEY.match(key)
        assert m is not None
        parsed.append((key, m["method"], int(m["index"]) if m["index"] is not None else None, m["field"]))
    variants: dict[tuple[int, str], _Variant] = {}
    last: list[dict[str, Any]] = [{} for _ in steps]  # each step's latest dump, to share unchanged sections
    seen: dict[str, Candidate] = {}
    schemes = quant_schemes()
    for combo in itertools.product(*(space[k] for k in keys)):
        cand_steps = [dict(s) for s in steps]  # shallow: _set copies what it changes
        applied: list[list[tuple[str, Any]]] = [[] for _ in steps]
        values: dict[str, Any] = {}
        sens: set[int] = set()
        for (key, method, index, fld), value in zip(parsed, combo):
            hit = False
            for i, s in enumerate(cand_steps):
                if not _selector_matches(s, method, index, i):
                    continue
                if fld == ALLOCATION:
                    if not allocation_applies(s):
                        continue
                    if value == "sensitivity":
                        sens.add(i)
                    hit = True
                    continue
                if method in schemes and fld != "scheme" and s.get("scheme", "int8") != method:
                    continue
                if s.get("method") == "quantize" and index is not None and fld == "bits" \
                        and s.get("scheme", "int8") != "cluster":
                    continue  # bits only mean something for clustering
                _set(s, fld, value)
                applied[i].append((fld, value))
                hit = True
            if hit:
                values[key] = value
        chosen = [_variant(variants, last, i, s, applied[i], values) for i, s in enumerate(cand_steps)]
        cand = Candidate(steps=[v.dump for v in chosen], values=values, sensitivity_steps=sorted(sens),
                         cost=sum(v.cost for v in chosen), data_steps=[i for i, v in enumerate(chosen) if v.needs_data],
                         digests=[v.digest for v in chosen])
        seen.setdefault(cand.id, cand)
    cands = list(seen.values())
    spread = {c.id: _bit_reverse(i, len(cands)) for i, c in enumerate(cands)}
    # cheapest first; within a cost tier, a bit-reversed grid order, so a search cut short by its budget
    # has still sampled the whole grid coarsely instead of one corner of it finely
    return sorted(cands, key=lambda c: (c.cost, spread[c.id]))


def _variant(memo: dict[tuple[int, str], _Variant], last: list[dict[str, Any]], i: int, step: dict[str, Any],
             applied: list[tuple[str, Any]], values: dict[str, Any]) -> _Variant:
    """Step ``i`` with ``applied`` (field, value) changes, validated; memoised on (i, changes).

    A section equal to the one in step ``i``'s previous variant is replaced by that one, so 512 variants
    of a step with a 1,000-entry ``layers`` map hold one copy of the map, not 512.
    """
    from compression.registry import get_technique

    memo_key = (i, json.dumps(applied))
    found = memo.get(memo_key)
    if found is not None:
        return found
    _drop_foreign_options(step)
    try:
        spec = get_technique(step["method"]).spec_model.model_validate(step)
    except ValidationError as e:
        err = e.errors()[0]
        raise InvalidSpec(f"search value makes step {i} invalid: {err['msg']}",
                          [{"loc": ["search", *values.keys()] or ["search"], "msg": err["msg"]}]) from None
    dump = spec.model_dump(mode="json")
    for k, v in dump.items():
        if isinstance(v, (dict, list)) and last[i].get(k) == v:
            dump[k] = last[i][k]
    last[i] = dump
    memo[memo_key] = found = _Variant(dump=dump, digest=step_digest(dump), cost=_step_cost(spec),
                                      needs_data=spec.needs_data)
    return found


def _bit_reverse(i: int, n: int) -> int:
    """Van der Corput order of ``i`` among ``n``: 0, n/2, n/4, 3n/4, …"""
    bits = max((n - 1).bit_length(), 1)
    return int(format(i, f"0{bits}b")[::-1], 2)
