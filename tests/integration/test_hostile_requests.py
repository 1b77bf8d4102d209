"""Small hostile requests through HTTP: each is refused cheaply, with its 4xx problem+json, and changes nothing.

The memory/CPU probes also assert the answer came within 2 s and that the API process's peak RSS grew by
less than 128 MiB: the peak (``VmHWM``) is reset to the current RSS just before the request, so an
earlier test's peak cannot hide this one's.
"""
from __future__ import annotations

import io
import json
import struct
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest

from testkit.stack import expect_problem, send_upload, tiny_classifier, upload

MAX_SECONDS = 2.0
MAX_GROWTH_KIB = 128 * 1024
BOUNDARY = "xxBOUNDARYxx"


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@contextmanager
def cheap(stack) -> Iterator[None]:
    """The block's requests take < 2 s and raise the API's peak RSS by < 128 MiB."""
    pid = stack.procs[0].pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux ≥ 4.0)
    before = _status_kib(pid, "VmHWM")
    t0 = time.monotonic()
    yield
    seconds = time.monotonic() - t0
    growth = _status_kib(pid, "VmHWM") - before
    assert seconds < MAX_SECONDS, f"answered in {seconds:.2f} s"
    assert growth < MAX_GROWTH_KIB, f"peak RSS grew by {growth // 1024} MiB"


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> tuple[Path, Path]:
    return tiny_classifier(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def tiny(stack, tiny_files) -> tuple[dict, dict]:
    """The tiny model and dataset, uploaded; and one spec validated, so that the API has imported the
    technique registry (a one-time second) before any request is timed."""
    c = stack.client()
    model, dataset = upload(c, tiny_files[0]), upload(c, tiny_files[1])
    r = c.post("/v1/jobs", json={"model_id": model["id"], "spec": {"steps": [{"method": "prune", "sparsity": 2}]}})
    expect_problem(r, 422, "invalid_spec")
    return model, dataset


def _jobs(stack) -> int:
    return len(stack.client().get("/v1/jobs?limit=100").json()["items"])


def _post_job(stack, body: dict) -> httpx.Response:
    return stack.client().post("/v1/jobs", json=body)


def _layers(n: int) -> dict[str, float]:
    return {f"fc{i}.weight": 0.5 for i in range(n)}


def _grid(points: int) -> dict[str, list]:
    """A search over a prune step with 512 (32 × 16) or 2,048 (32 × 32 × 2) candidates."""
    assert points in (512, 2048)
    grid: dict[str, list] = {"prune.sparsity": [round(0.1 + 0.02 * i, 2) for i in range(32)],
                             "prune.max_layer_sparsity": [round(0.1 + 0.02 * i, 2) for i in range(16 if points == 512 else 32)]}
    if points == 2048:
        grid["prune.importance"] = ["l1", "l2"]
    return grid


# ---------------------------------------------------------------- JSON bodies


@pytest.mark.parametrize("layers, path, words", [
    (1600, "$.spec.steps[0].layers", "at most 1024 layers"),  # the reported probe, 35 KiB of JSON
    (1000, "$.spec.search", "2048 points"),  # a map under the cap: the grid is refused from its list lengths
])
def test_big_search_spec_refused_cheaply(stack, tiny, layers, path, words):
    """A ``layers`` map in a 2,048-point search: refused before the grid is expanded or the map validated."""
    model, _ = tiny
    before = _jobs(stack)
    body = {"model_id": model["id"], "spec": {"steps": [{"method": "prune", "layers": _layers(layers)}],
                                              "search": _grid(2048), "target": {"metric": "agreement"}}}
    assert len(json.dumps(body)) < 40_000
    with cheap(stack):
        r = _post_job(stack, body)
    problem = expect_problem(r, 422, "invalid_spec")
    assert words in problem["detail"] and problem["errors"][0]["path"] == path
    assert _jobs(stack) == before


def test_json_body_past_the_element_cap_is_413(stack, tiny):
    """A 1 MiB body of 250,000 tiny values is refused by counting, before pydantic sees it."""
    model, _ = tiny
    before = _jobs(stack)
    body = {"model_id": model["id"], "spec": {"steps": [{"method": "prune"}], "pad": [[]] * 250_000}}
    with cheap(stack):
        r = _post_job(stack, body)
    problem = expect_problem(r, 413, "too_large")
    assert problem["errors"][0]["path"] == "$.spec.pad"
    assert _jobs(stack) == before


def test_large_search_within_every_cap_is_cheap(stack, tiny):
    """1,000 layers × 512 candidates is allowed: validating it costs the map once per variant, not 512 copies."""
    model, _ = tiny
    body = {"model_id": model["id"], "spec": {"steps": [{"method": "prune", "layers": _layers(1000)}],
                                              "search": _grid(512), "target": {"metric": "agreement"},
                                              "budget": {"trials": 1}}}
    with cheap(stack):
        r = _post_job(stack, body)
    assert r.status_code == 202, r.text
    c = stack.client()
    c.post(f"/v1/jobs/{r.json()['id']}/cancel")  # its layer names are made up; no need to run it


# ---------------------------------------------------------------- multipart fields


def _multipart(fields: list[tuple[str, bytes]], file: bytes | None = b"x") -> Iterator[bytes]:
    """A streamed (chunked: no Content-Length) multipart body: text fields, then a file part."""
    for name, value in fields:
        yield f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value + b"\r\n"
    if file is not None:
        yield (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="d.npz"\r\n'
               "Content-Type: application/octet-stream\r\n\r\n").encode() + file + b"\r\n"
    yield f"--{BOUNDARY}--\r\n".encode()


def _post_multipart(stack, content) -> httpx.Response:
    return stack.client().post("/v1/datasets", content=content,
                               headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})


def test_too_many_form_fields_is_413(stack, unchanged):
    fields = [(f"f{i}", b"v") for i in range(17)]
    problem = expect_problem(_post_multipart(stack, b"".join(_multipart(fields))), 413, "too_large")
    assert "16" in problem["detail"]


def test_form_fields_past_their_total_are_413(stack, unchanged):
    fields = [(f"f{i}", b"v" * 60_000) for i in range(5)]  # each under the 64 KiB field cap; 300 kB together
    problem = expect_problem(_post_multipart(stack, b"".join(_multipart(fields))), 413, "too_large")
    assert str(256 * 1024) in problem["detail"]


def test_streamed_form_fields_are_cut_off_early(stack, unchanged):
    """The reported probe: hundreds of MiB of fields in one chunked request. Refused at the 256 KiB budget."""
    def body() -> Iterator[bytes]:
        yield from _multipart([(f"f{i}", b"v" * 60_000) for i in range(4000)], file=None)  # 240 MB

    with cheap(stack):
        r = _post_multipart(stack, body())
    expect_problem(r, 413, "too_large")


def test_chunked_body_past_the_upload_cap_is_413(stack, tiny_files, unchanged):
    """A small valid upload followed by more than the upload cap of bytes after its closing boundary."""
    data = tiny_files[1].read_bytes()

    def body() -> Iterator[bytes]:
        yield from _multipart([], file=data)
        for _ in range(21):  # the stack's cap is 20 MiB
            yield b"\0" * (1024 * 1024)

    expect_problem(_post_multipart(stack, body()), 413, "too_large")


# ---------------------------------------------------------------- zips and .npz


def test_model_zip_past_the_ratio_refused_before_inflating(stack, tiny_files, unchanged):
    """A 70 KB zip that would inflate to 64 MiB (under the 80 MiB size cap): refused from its directory."""
    blob = _npz({"model.onnx": tiny_files[0].read_bytes(), "weights.bin": b"\0" * (64 * 1024 * 1024)},
                zipfile.ZIP_DEFLATED)
    assert len(blob) < 100_000
    with cheap(stack):
        r = send_upload(stack.client(), "m.zip", blob)
    problem = expect_problem(r, 422, "invalid_model")
    assert "weights.bin" in problem["detail"] and "zip bomb" in problem["detail"]


@pytest.fixture(scope="module")
def many_members() -> bytes:
    """An 18 MiB zip of 200,000 empty members (under the stack's 20 MiB upload cap)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(200_000):
            zf.writestr(f"{i}.npy", b"")
    return buf.getvalue()


@pytest.mark.parametrize("route, name, code", [("/v1/models", "m.zip", "invalid_model"),
                                               ("/v1/datasets", "d.npz", "invalid_dataset")])
def test_zip_with_a_huge_directory_refused_before_it_is_parsed(stack, unchanged, many_members, route, name, code):
    with cheap(stack):
        r = stack.client().post(route, files={"file": (name, many_members)})
    assert "central directory" in expect_problem(r, 422, code)["detail"]


def _npy(shape: tuple, descr: str = "<f4", data: bytes = b"") -> bytes:
    """An ``.npy`` member with any header numpy's writer will format (negative or huge dims included)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": descr, "fortran_order": False, "shape": shape})
    return header.getvalue() + data


def _npz(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    """A zip of these members (not zip64, unlike ``np.savez``: its size fields are easy to patch)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_npz_member_past_the_ratio_refused_before_streaming(stack, unchanged):
    rows = 1024 * 1024  # 64 MiB of float32 zeros: under the 2 GiB array cap, 1,000× compressible
    blob = _npz({"input.npy": _npy((rows, 16), data=b"\0" * (rows * 64))}, zipfile.ZIP_DEFLATED)
    assert len(blob) < 100_000
    with cheap(stack):
        r = send_upload(stack.client(), "d.npz", blob)
    problem = expect_problem(r, 422, "invalid_dataset")
    assert "zip bomb" in problem["detail"]


@pytest.mark.parametrize("shape, words", [
    ((-5, 16), "negative"),
    ((2**32, 2**32), "dimension over"),  # numpy's int64 product wraps to 0
    ((2**64, 16), "dimension over"),
    ((0, 16), "no samples"),
    ((True, 16), "not a list of integers"),
])
def test_npz_header_arithmetic(stack, unchanged, shape, words):
    blob = _npz({"input.npy": _npy(shape)})  # no data: the header alone is refused
    problem = expect_problem(send_upload(stack.client(), "d.npz", blob),
                             422, "invalid_dataset")
    assert words in problem["detail"]


_ARRAY = np.arange(64, dtype=np.float32).reshape(4, 16)


def _valid_npy() -> bytes:
    return _npy((4, 16), data=_ARRAY.tobytes())


@pytest.mark.parametrize("member", [
    pytest.param(_valid_npy().replace(b"\x93NUMPY\x01\x00v\x00", b"\x93NUMPY\x01\x00\xff\xff"), id="header-too-long"),
    pytest.param(_valid_npy().replace(b"'<f4'", b"'xyz'"), id="bad-descr"),
    pytest.param(_valid_npy().replace(b"'<f4'", b"'|O8'"), id="object-dtype"),
    pytest.param(_valid_npy().replace(b"'<f4'", b"'|V4'"), id="void-dtype"),
    pytest.param(_valid_npy().replace(b"{'descr'", b"['descr'"), id="not-a-dict"),
    pytest.param(_valid_npy()[:40], id="header-cut-short"),
    pytest.param(_valid_npy()[:-4], id="data-shorter-than-the-header-says"),
    pytest.param(_valid_npy() + b"\0" * 64, id="data-longer-than-the-header-says"),
])
def test_malformed_npy_member_is_422(stack, unchanged, member):
    blob = _npz({"input.npy": member})
    expect_problem(send_upload(stack.client(), "d.npz", blob), 422, "invalid_dataset")


def _patch_sizes(blob: bytes, size: int) -> bytes:
    """Rewrite the uncompressed size the zip declares for its (one, non-zip64) member, in both headers."""
    out = bytearray(blob)
    local, central = out.find(b"PK\x03\x04"), out.find(b"PK\x01\x02")
    struct.pack_into("<I", out, local + 22, size)
    struct.pack_into("<I", out, central + 24, size)
    return bytes(out)


def _flip_data_byte(blob: bytes) -> bytes:
    """Corrupt one byte of the array data (not its header): only the CRC can tell."""
    out = bytearray(blob)
    at = out.find(_ARRAY.tobytes()) + 100
    out[at] ^= 0xFF
    return bytes(out)


@pytest.mark.parametrize("mangle", [
    pytest.param(_flip_data_byte, id="bad-crc"),
    pytest.param(lambda b: _patch_sizes(b, 40), id="declares-fewer-bytes"),
    pytest.param(lambda b: _patch_sizes(b, 4000), id="declares-more-bytes"),
    pytest.param(lambda b: b[: len(b) // 2], id="truncated"),
])
def test_corrupt_npz_zip_is_422(stack, unchanged, mangle):
    good = _npz({"input.npy": _valid_npy()})
    blob = mangle(good)
    assert blob != good
    expect_problem(send_upload(stack.client(), "d.npz", blob), 422, "invalid_dataset")
