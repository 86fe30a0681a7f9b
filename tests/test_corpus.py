"""Corpus stage on real text and the real GPT-NeoX tokenizer: packing, determinism, sources."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

from coact.codes.corpus import CorpusConfig, build_contexts, iter_documents
from coact.errors import CoactError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TOKENIZER_FILE = DATA / "gpt-neox-20b-tokenizer.json"
if not TOKENIZER_FILE.is_file():
    pytest.skip(f"real tokenizer not found at {TOKENIZER_FILE}", allow_module_level=True)

DOCS = ["Hello world", "The cat sat on the mat.", "Good night"]  # ids checked by hand below


@pytest.fixture(scope="module")
def tok():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(TOKENIZER_FILE), bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )


def _jsonl(path: Path, texts: list[str], column: str = "text") -> Path:
    path.write_text("".join(json.dumps({column: t, "n": i}) + "\n" for i, t in enumerate(texts)))
    return path


def _paragraphs(name: str, n: int) -> list[str]:
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()
    return [line for line in lines if len(line) > 200][:n]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_tokenizer_ids_used_below(tok):
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in DOCS]
    assert ids == [[12092, 1533], [510, 5798, 2206, 327, 253, 1111, 15], [8620, 2360]]
    assert tok.bos_token_id == tok.eos_token_id == 0


def test_packing_by_hand(tok, tmp_path):
    # shuffle_buffer=1 keeps source order; stream: 2 + EOS + 7 + EOS + 2 = 13 tokens.
    source = str(_jsonl(tmp_path / "docs.jsonl", DOCS))
    out = build_contexts(CorpusConfig(source, ctx_len=5, n_tokens=12, shuffle_buffer=1), tok)
    assert out.tokens.tolist() == [
        [0, 12092, 1533, 0, 510],
        [0, 5798, 2206, 327, 253],
        [0, 1111, 15, 0, 8620],
    ]
    assert out.doc_ids.tolist() == [[-1, 0, 0, -1, 1], [-1, 1, 1, 1, 1], [-1, 1, 1, -1, 2]]
    assert out.tokens.dtype == torch.int64 and out.doc_ids.dtype == torch.int32
    assert (out.n_tokens, out.n_documents, out.source) == (12, 3, source)
    # n_tokens=9 still asks for ceil(9 / 4) = 3 contexts: the last one is completed.
    assert torch.equal(
        build_contexts(CorpusConfig(source, ctx_len=5, n_tokens=9, shuffle_buffer=1), tok).tokens,
        out.tokens,
    )
    # Without BOS the contexts are the same stream, ctx_len tokens each.
    raw = build_contexts(
        CorpusConfig(source, ctx_len=4, n_tokens=12, shuffle_buffer=1, prepend_bos=False), tok
    )
    assert torch.equal(raw.tokens, out.tokens[:, 1:]) and raw.n_tokens == 12
    # The corpus runs out: only full contexts are kept (13 tokens → 3 of 4).
    short = build_contexts(CorpusConfig(source, ctx_len=5, n_tokens=100, shuffle_buffer=1), tok)
    assert torch.equal(short.tokens, out.tokens)


def test_same_seed_same_contexts_other_seed_other_order(tok, tmp_path):
    source = str(_jsonl(tmp_path / "wiki.jsonl", _paragraphs("wikitext-2-valid.txt", 400)))
    config = CorpusConfig(source, ctx_len=64, n_tokens=6000, seed=3, shuffle_buffer=50)
    a, b = build_contexts(config, tok), build_contexts(config, tok)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.doc_ids, b.doc_ids)
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64
    c = build_contexts(CorpusConfig(source, ctx_len=64, n_tokens=6000, seed=4), tok)
    assert c.tokens.shape == a.tokens.shape == (96, 64)
    assert not torch.equal(a.tokens, c.tokens) and a.fingerprint != c.fingerprint
    order = [int(d) for d in a.doc_ids.flatten().unique_consecutive() if d >= 0]
    assert order != sorted(order)  # shuffled, not the file order
    assert a.n_documents == len(set(order)) < 400  # stopped reading once it had enough


def test_long_document_spans_contexts_in_order(tok, tmp_path):
    play = (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")[:20_000]
    texts = ["A short note.", play, "Another short note."]
    source = str(_jsonl(tmp_path / "mixed.jsonl", texts))
    out = build_contexts(CorpusConfig(source, ctx_len=32, n_tokens=3000, shuffle_buffer=1), tok)
    assert (out.tokens[:, 0] == 0).all() and (out.doc_ids[:, 0] == -1).all()
    play_ids = tok(play, add_special_tokens=False)["input_ids"]
    assert out.doc_ids.eq(1).any(1).sum() > 3  # the play spans many contexts
    # Its tokens appear contiguously and in order across contexts, cut at the last context.
    got = out.tokens[out.doc_ids == 1].tolist()
    note = len(tok(texts[0], add_special_tokens=False)["input_ids"])
    assert got == play_ids[: len(got)] and len(got) == 97 * 31 - note - 1  # ceil(3000/31) = 97


def test_a_text_file_is_one_document(tok):
    source = str(DATA / "tinyshakespeare.txt")
    docs = list(iter_documents(CorpusConfig(source)))
    assert len(docs) == 1 and docs[0].startswith("First Citizen")
    out = build_contexts(CorpusConfig(source, ctx_len=128, n_tokens=2000), tok)
    assert out.tokens.shape == (16, 128) and out.n_documents == 1
    expected = tok(docs[0][:20_000], add_special_tokens=False)["input_ids"][: 16 * 127]
    assert out.tokens[:, 1:].flatten().tolist() == expected


def test_embedded_source(tok):
    start = time.perf_counter()
    docs = list(iter_documents(CorpusConfig()))
    assert len(docs) > 300 and all(d.strip() for d in docs)
    assert time.perf_counter() - start < 15
    assert "antigravity" not in sys.modules and "this" not in sys.modules  # parsed, not imported
    out = build_contexts(CorpusConfig(ctx_len=128, n_tokens=20_000, seed=1), tok)
    assert out.tokens.shape == (158, 128) and out.n_tokens == 158 * 127
    assert out.n_documents > 5 and out.tokens.max() < len(tok)


def test_folder_source(tok, tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("first file")
    (tmp_path / "sub" / "b.md").write_text("# second\n\nfile")
    _jsonl(tmp_path / "c.jsonl", ["third", "fourth"])
    (tmp_path / "ignored.bin").write_bytes(b"\xff\xfe\x00")
    docs = list(iter_documents(CorpusConfig(str(tmp_path))))
    assert docs == ["first file", "third", "fourth", "# second\n\nfile"]
    out = build_contexts(CorpusConfig(str(tmp_path), ctx_len=4, n_tokens=6), tok)
    assert out.tokens.shape == (2, 4) and out.n_documents >= 2


def test_jsonl_with_another_column_and_bad_line(tmp_path):
    path = _jsonl(tmp_path / "x.jsonl", ["alpha", "beta"], column="body")
    assert list(iter_documents(CorpusConfig(str(path), text_column="body"))) == ["alpha", "beta"]
    with pytest.raises(CoactError, match=r"x\.jsonl:1 .*'text'"):
        list(iter_documents(CorpusConfig(str(path))))


def test_local_saved_dataset(tok, tmp_path):
    import datasets

    texts = _paragraphs("wikitext-2-valid.txt", 30)
    datasets.Dataset.from_dict({"text": texts, "n": list(range(30))}).save_to_disk(tmp_path / "d")
    assert list(iter_documents(CorpusConfig(str(tmp_path / "d")))) == texts
    out = build_contexts(CorpusConfig(str(tmp_path / "d"), ctx_len=64, n_tokens=1000), tok)
    assert out.tokens.shape == (16, 64)
    with pytest.raises(CoactError, match=r"no column 'body'.*'text', 'n'"):
        list(iter_documents(CorpusConfig(str(tmp_path / "d"), text_column="body")))
    split = datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": texts[:3]})})
    split.save_to_disk(tmp_path / "dd")
    config = CorpusConfig(str(tmp_path / "dd"), split="validation")
    assert list(iter_documents(config)) == texts[:3]
    with pytest.raises(CoactError, match="no split 'train'"):
        list(iter_documents(CorpusConfig(str(tmp_path / "dd"))))


def test_hub_id_offline_fails_fast_and_clearly(tok, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(CoactError) as caught:
        build_contexts(CorpusConfig("no-such-owner/no-such-corpus:raw"), tok)
    assert time.perf_counter() - start < 10
    message = str(caught.value)
    assert "'no-such-owner/no-such-corpus:raw'" in message and "embedded" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda p: p / "missing.txt", "corpus path .* does not exist"),
        (lambda p: p / "no" / "such" / "dir", "corpus path .* does not exist"),
        (lambda p: _write(p / "empty.txt", b""), "is empty"),
        (lambda p: _write(p / "blank.txt", b"  \n\n\t\n"), "is empty"),
        (lambda p: (p / "empty_dir").mkdir() or p / "empty_dir", "is empty"),
        (lambda p: _write(p / "binary.txt", bytes(range(256))), r"binary\.txt as UTF-8"),
        (lambda p: _write(p / "tiny.txt", b"Hello world"), r"only 2 tokens.*ctx_len"),
    ],
    ids=["missing-file", "missing-dir", "empty", "blank", "empty-dir", "binary", "too-short"],
)
def test_unusable_corpora_raise_clear_errors(tok, tmp_path, make, pattern):
    source = str(make(tmp_path))
    with pytest.raises(CoactError, match=pattern):
        build_contexts(CorpusConfig(source, ctx_len=16, n_tokens=100), tok)


def test_missing_relative_path(tok):
    with pytest.raises(CoactError, match=r"corpus path \./nope does not exist"):
        build_contexts(CorpusConfig("./nope"), tok)
