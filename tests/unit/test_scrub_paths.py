"""scrub_paths: server paths out of messages, the prose around them untouched."""
from __future__ import annotations

import pytest

from compression.errors import scrub_paths


@pytest.mark.parametrize("message, expected", [
    ("Load model from /srv/nc/tmp/upload-1/unzipped/model.onnx failed:Fatal error",
     "Load model from model.onnx failed:Fatal error"),
    ("No such file or directory: '/var/lib/nc/artifacts/models/ab/model.zip'", "No such file or directory: 'model.zip'"),
    ('at "/root/.cache/x.py", line 3 (/opt/a/b.so)', 'at "x.py", line 3 (b.so)'),
    ("cannot open file:///etc/passwd", "cannot open passwd"),
    ("cannot open var/tmp/u1/weights.bin", "cannot open weights.bin"),
])
def test_paths_become_file_names(message, expected):
    assert scrub_paths(message, roots=["var"]) == expected


@pytest.mark.parametrize("message", [
    "teachers: 'original' and/or model ids", "1/2 of the channels", "see http://example.com/docs/x",
    "steps[0]/sparsity", "input a/b has shape [1, 3]", "variable var is unset",
    # ONNX node names look like absolute paths; an error naming a layer must keep naming it
    "exits must name nodes whose output no skip connection crosses; valid: '/features/features.3/MaxPool'",
])
def test_prose_is_left_alone(message):
    assert scrub_paths(message, roots=["var"]) == message
