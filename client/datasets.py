"""Text datasets built on the client: a text file cut into fixed-length windows of token ids, as the ``.npz``
the API takes (``input_ids`` int64 ``[N, T]``, optionally ``attention_mask``). The REST contract is unchanged:
the server only ever sees arrays.

Tokens come from a local ``tokenizer.json`` (the ``tokenizers`` package, imported only when one is given) or
are the file's raw bytes (``byte_level``: ids 0–255, no tokenizer at all).

Example:
    >>> arrays = text_windows("notes.txt", seq_len=64, byte_level=True)          # doctest: +SKIP
    >>> arrays["input_ids"].shape, arrays["attention_mask"][-1, -3:]             # doctest: +SKIP
    ((120, 64), array([1, 0, 0]))
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

IDS = "input_ids"
MASK = "attention_mask"


class TextDataError(ValueError):
    """A text dataset that cannot be built, in one line a user can act on (the CLI exits 2 with it)."""


def _check_numbers(seq_len: int, stride: int | None, limit: int | None) -> None:
    for what, value, least in (("seq_len", seq_len, 2), ("stride", stride, 1), ("limit", limit, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            why = " (a window needs a token and the one after it)" if what == "seq_len" else ""
            raise TextDataError(f"{what} must be an integer of at least {least}{why}, not {value!r}")


def _check_files(path: str | os.PathLike, tokenizer: str | os.PathLike | None, byte_level: bool) -> Path:
    if (tokenizer is None) == (not byte_level):
        raise TextDataError("give a tokenizer (tokenizer.json) or byte-level ids, one of the two"
                            if tokenizer is None else "give a tokenizer or byte-level ids, not both")
    p = Path(path)
    if not p.is_file():
        raise TextDataError(f"no such text file: {p}")
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise TextDataError(f"no such tokenizer file: {tokenizer}")
    return p


def _load_tokenizer(path: str | os.PathLike) -> Any:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise TextDataError("reading a tokenizer.json needs the 'tokenizers' package (pip install tokenizers), "
                            "or use byte-level ids") from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception for any bad file
        raise TextDataError(f"{path} is not a tokenizer.json: {str(e).splitlines()[0][:200]}") from None


def read_tokens(path: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
                byte_level: bool = False) -> tuple[np.ndarray, int]:
    """All token ids of a text file (int64) and the id to pad with (the tokenizer's, else 0).

    Raises:
        TextDataError: no file, an empty one, no tokenizer file, both or neither of tokenizer / byte level.
    """
    p = _check_files(path, tokenizer, byte_level)
    raw = p.read_bytes()
    if not raw.strip():
        raise TextDataError(f"{p} holds no text")
    if byte_level:
        return np.frombuffer(raw, np.uint8).astype(np.int64), 0
    tok = _load_tokenizer(tokenizer)  # type: ignore[arg-type]
    ids = np.asarray(tok.encode(raw.decode("utf-8", errors="replace"), add_special_tokens=False).ids, np.int64)
    pad = (tok.padding or {}).get("pad_id", 0)
    return ids, int(pad)


def windows(ids: np.ndarray, *, seq_len: int, stride: int | None = None, limit: int | None = None,
            attention_mask: bool = True, pad_id: int = 0, source: str = "the text") -> dict[str, np.ndarray]:
    """Fixed-length windows of ``ids`` every ``stride`` tokens (default ``seq_len``: no overlap), at most ``limit``.

    With ``attention_mask`` the arrays are ``input_ids`` and ``attention_mask`` (ones), and a short last window
    is padded with ``pad_id`` under mask 0. Without one nothing could mark padding, so the last window ends
    where the text does instead (it overlaps the one before it) and a text shorter than ``seq_len`` is refused.
    A tail of one token (no next-token pair) is left out.

    Example:
        >>> w = windows(np.arange(5), seq_len=3)
        >>> w["input_ids"].tolist(), w["attention_mask"].tolist()
        ([[0, 1, 2], [3, 4, 0]], [[1, 1, 1], [1, 1, 0]])
        >>> windows(np.arange(5), seq_len=3, attention_mask=False)["input_ids"].tolist()
        [[0, 1, 2], [2, 3, 4]]
    """
    _check_numbers(seq_len, stride, limit)
    n, step = len(ids), stride or seq_len
    if n < 2:
        raise TextDataError(f"{source} has {n} token(s): a window needs at least 2")
    if not attention_mask and n < seq_len:
        raise TextDataError(f"{source} has {n} tokens, fewer than seq_len {seq_len}: lower it, or pad under an "
                            "attention mask")
    starts = list(range(0, n - seq_len + 1, step)) if n >= seq_len else []
    if not starts or starts[-1] + seq_len < n:  # a tail no full window covers
        if attention_mask:
            tail = starts[-1] + step if starts else 0
            if n - tail >= 2:
                starts.append(tail)
        elif n - seq_len > starts[-1]:
            starts.append(n - seq_len)
    starts = starts[:limit]
    out = np.full((len(starts), seq_len), pad_id, np.int64)
    mask = np.zeros((len(starts), seq_len), np.int64)
    for i, s in enumerate(starts):
        piece = ids[s:s + seq_len]
        out[i, :len(piece)] = piece
        mask[i, :len(piece)] = 1
    return {IDS: out, MASK: mask} if attention_mask else {IDS: out}


def text_windows(path: str | os.PathLike, *, seq_len: int = 128, tokenizer: str | os.PathLike | None = None,
                 byte_level: bool = False, limit: int | None = None, attention_mask: bool = True,
                 stride: int | None = None, ids_name: str = IDS) -> dict[str, np.ndarray]:
    """A text file as the arrays of a language-model dataset: :func:`read_tokens` then :func:`windows`,
    the ids named ``ids_name`` (the model's token input).

    Raises:
        TextDataError: every mistake (no file, empty text, both or neither of tokenizer / byte level,
            ``seq_len < 2``), before anything is uploaded.
    """
    _check_numbers(seq_len, stride, limit)
    ids, pad = read_tokens(path, tokenizer=tokenizer, byte_level=byte_level)
    arrays = windows(ids, seq_len=seq_len, stride=stride, limit=limit, attention_mask=attention_mask, pad_id=pad,
                     source=str(path))
    if ids_name != IDS:
        arrays[ids_name] = arrays.pop(IDS)
    return arrays


def lm_inputs(inputs: list[dict[str, Any]]) -> tuple[str, bool]:
    """From a model's inputs (as the API lists them: ``name, dtype, shape``): the token-id input's name
    (``input_ids``, else the only 2-D integer input, else ``input_ids``) and whether it takes ``attention_mask``."""
    names = [i["name"] for i in inputs]
    ints = [i["name"] for i in inputs if len(i.get("shape") or []) == 2 and "int" in str(i.get("dtype"))
            and i["name"] != MASK]
    ids = IDS if IDS in names else ints[0] if len(ints) == 1 else IDS
    return ids, MASK in names
