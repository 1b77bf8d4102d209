"""Text files as language-model datasets, built on the client (client/datasets.py) and refused by the CLI
with one line and exit 2 before anything is uploaded."""
from __future__ import annotations

import numpy as np
import pytest

from client.datasets import TextDataError, lm_inputs, text_windows, windows
from netcompress.cli import main

TEXT = "The quick brown fox jumps over the lazy dog.\n" * 3  # 135 bytes


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT)
    return p


def test_byte_windows_padding_stride_and_limit(text_file):
    raw = np.frombuffer(TEXT.encode(), np.uint8).astype(np.int64)
    a = text_windows(text_file, seq_len=32, byte_level=True)
    ids, mask = a["input_ids"], a["attention_mask"]
    assert ids.dtype == np.int64 and mask.dtype == np.int64 and ids.shape == (5, 32)  # 4 full + a tail of 7
    assert (ids[:4].ravel() == raw[:128]).all() and (ids[4, :7] == raw[128:]).all()
    assert (mask[:4] == 1).all() and mask[4].tolist() == [1] * 7 + [0] * 25 and (ids[4, 7:] == 0).all()
    # without a mask the last window ends where the text does (no padding to mark)
    b = text_windows(text_file, seq_len=32, byte_level=True, attention_mask=False)
    assert set(b) == {"input_ids"} and (b["input_ids"][-1] == raw[-32:]).all() and len(b["input_ids"]) == 5
    # overlapping windows, a limit, another name for the ids
    c = text_windows(text_file, seq_len=32, stride=16, limit=3, byte_level=True, ids_name="tokens")
    assert c["tokens"].shape == (3, 32) and (c["tokens"][1, :16] == c["tokens"][0, 16:]).all()
    # a one-token tail has no next-token pair: left out
    assert windows(np.arange(7), seq_len=3)["input_ids"].tolist() == [[0, 1, 2], [3, 4, 5]]


def test_a_tokenizer_json(tmp_path, text_file):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "The", "quick", "brown", "fox", "jumps", "over",
                                         "the", "lazy", "dog", "."])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    a = text_windows(text_file, seq_len=8, tokenizer=path)
    sentence = [2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert a["input_ids"].ravel()[:30].tolist() == sentence * 3 and a["input_ids"].shape == (4, 8)
    assert a["attention_mask"][-1].tolist() == [1] * 6 + [0] * 2
    assert tokenizers.__version__


@pytest.mark.parametrize("args, message", [
    (["--texts", "missing.txt", "--bytes"], "no such text file: missing.txt"),
    (["--texts", "{text}"], "--texts needs --tokenizer tokenizer.json or --bytes"),
    (["--texts", "{text}", "--bytes", "--tokenizer", "{text}"], "give --tokenizer or --bytes, not both"),
    (["--texts", "{text}", "--bytes", "--seq-len", "1"], "seq_len must be an integer of at least 2"),
    (["--texts", "{empty}", "--bytes"], "holds no text"),
    (["--texts", "{text}", "--tokenizer", "nope.json"], "no such tokenizer file: nope.json"),
    (["--texts", "{text}", "--bytes", "--data", "d.npz"], "give --data or --texts, not both"),
    (["--bytes"], "--tokenizer and --bytes go with --texts FILE"),
])
def test_cli_text_mistakes_exit_2_before_any_upload(args, message, tmp_path, text_file, capsys):
    """The API URL points at a closed port: had the CLI uploaded anything it would exit 3, not 2."""
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    args = [a.format(text=text_file, empty=empty) for a in args]
    code = main(["submit", str(text_file), "--quantize", "fp16", "--url", "http://127.0.0.1:9", "--api-key", "nc_x",
                 *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_token_input_and_mask_from_the_model_inputs():
    gpt = [{"name": "input_ids", "dtype": "int64", "shape": ["n", 32]}]
    bert = [{"name": "ids", "dtype": "int64", "shape": ["n", "t"]},
            {"name": "attention_mask", "dtype": "int64", "shape": ["n", "t"]}]
    assert lm_inputs(gpt) == ("input_ids", False) and lm_inputs(bert) == ("ids", True)
    with pytest.raises(TextDataError, match="fewer than seq_len 8"):
        windows(np.arange(5), seq_len=8, attention_mask=False)
