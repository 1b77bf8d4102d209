"""README's spec reference is the one generated from the techniques' pydantic models."""
from __future__ import annotations

from pathlib import Path

from netcompress.specref import current_block, render

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_spec_reference_is_current():
    assert current_block(README) == render(), (
        "README's spec reference is stale: run `netcompress spec-reference --write README.md`")


def test_reference_covers_every_technique_and_field():
    from compression.registry import get_technique, list_techniques

    text = render()
    for name in list_techniques():
        assert f"`method: {name}`" in text
        for field in get_technique(name).spec_model.model_fields:
            if field != "method":
                assert f"| `{field}` |" in text, (name, field)
