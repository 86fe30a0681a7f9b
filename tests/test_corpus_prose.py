"""The embedded corpus's prose part and its mixing rule: the shipped WikiText-2 file and its
notice, articles split at headings, the share of prose tokens, determinism, the old names,
and a fingerprint that changed with the corpus."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import tomllib
from pathlib import Path

import pytest
import torch

from coact.codes.corpus import (
    EMBEDDED,
    EMBEDDED_DOCS,
    EMBEDDED_PROSE,
    PROSE_SHARE,
    CorpusConfig,
    _interleaved,
    build_contexts,
    iter_documents,
)
from coact.codes.prose import (
    NOTICE_FILE,
    PROSE_FILE,
    detokenize,
    prose_documents,
    prose_path,
    split_articles,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
TOKENIZER_FILE = DATA / "gpt-neox-20b-tokenizer.json"
needs_tokenizer = pytest.mark.skipif(
    not TOKENIZER_FILE.is_file(), reason=f"real tokenizer not found at {TOKENIZER_FILE}"
)


@pytest.fixture(scope="module")
def tok():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(TOKENIZER_FILE), bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )


def test_detokenize_by_hand() -> None:
    line = (
        'It weighs 3 @.@ 5 kg ( 7 @,@ 700 lb ) ; " it \'s red , " he said . A well @-@ kept 5 % .'
    )
    assert detokenize(line) == 'It weighs 3.5 kg (7,700 lb); "it\'s red," he said. A well-kept 5%.'
    # an odd number of double quotes: which one opens is unknown, so their spaces stay
    assert detokenize('a " b " c " d') == 'a " b " c " d'
    assert detokenize("do n't") == "do n't" and detokenize("isn 't") == "isn't"


def test_split_at_article_headings_by_hand() -> None:
    lines = [
        " \n",
        " = First = \n",
        " \n",
        " Text of the first , one . \n",
        " \n",
        " = = A section = = \n",
        " \n",
        " More text \n",
        " = 1 x and y = \n",  # a formula inside an article, after text: not a heading
        " \n",
        " = Second = \n",
        " \n",
        " Second text . \n",
    ]
    articles = split_articles(lines)
    assert [a[0] for a in articles] == [" = First = ", " = Second = "]
    assert " = 1 x and y = " in articles[0] and len(articles[0]) == 9


def test_shipped_prose_is_wikitext2_in_120_articles() -> None:
    docs = prose_documents()
    assert len(docs) == 120  # WikiText-2 has 60 articles in validation and 60 in test
    assert docs[0].startswith("Homarus gammarus\n\nHomarus gammarus, known as the European")
    assert docs[60].startswith("Robert <unk>\n\nRobert <unk> is an English")  # test's first
    assert all(" = " not in d.split("\n\n")[0] and "@-@" not in d for d in docs)
    assert not any(line.startswith(" = ") for d in docs for line in d.splitlines())


@pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data not found at {DATA}")
def test_shipped_file_is_the_two_splits_byte_for_byte() -> None:
    raw = (DATA / "wikitext-2-valid.txt").read_bytes() + (DATA / "wikitext-2-test.txt").read_bytes()
    assert gzip.decompress(prose_path().read_bytes()) == raw
    assert prose_path().stat().st_size < 1_000_000  # modest: ~0.8 MB compressed


def test_attribution_ships_beside_the_file_and_as_package_data() -> None:
    notice = (prose_path().parent / NOTICE_FILE).read_text(encoding="utf-8")
    for needed in ("CC BY-SA 3.0", "creativecommons.org/licenses/by-sa/3.0", "Merity", PROSE_FILE):
        assert needed in notice
    settings = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = settings["tool"]["setuptools"]["package-data"]["coact"]
    shipped = {p.name for pattern in patterns for p in (ROOT / "coact").glob(pattern)}
    assert {PROSE_FILE, NOTICE_FILE} <= shipped


def test_interleave_rule_by_hand() -> None:
    docs = iter([(0, [1] * 5), (1, [1] * 5), (2, [1] * 5)])
    prose = iter([(10, [2] * 3), (11, [2] * 10), (12, [2] * 2)])
    # prose 0 ≤ 0 → P; 3 > 1.5 → D; 3 ≤ 4 → P; 13 > 9 → D; 13 > 11.5 → D; 13 ≤ 14 → P
    order = [index for index, _ in _interleaved(docs, prose, 0.5)]
    assert order == [10, 0, 11, 1, 2, 12]
    # one stream runs out: the other continues alone
    order = [i for i, _ in _interleaved(iter([(0, [1]), (1, [1])]), iter([(9, [2] * 8)]), 0.5)]
    assert order == [9, 0, 1]


def _doc_order(contexts) -> list[int]:
    """Documents in the order they were packed (each one's tokens are contiguous)."""
    return [d for d in dict.fromkeys(contexts.doc_ids.flatten().tolist()) if d >= 0]


def _prose_tokens(contexts, n_docs: int) -> tuple[int, int]:
    ids = contexts.doc_ids[contexts.doc_ids >= 0]
    return int((ids >= n_docs).sum()), int(ids.numel())


@needs_tokenizer
@pytest.mark.parametrize("seed", [0, 1])
def test_prose_share_within_the_rule_bound(tok, seed: int) -> None:
    """prose − ½·all lies within ±½ the longest document taken (the greedy rule's bound),
    and at the default run's 500k tokens the share is 0.5 ± 0.02."""
    docs = list(iter_documents(CorpusConfig(EMBEDDED_DOCS)))
    every = list(iter_documents(CorpusConfig(EMBEDDED)))
    for n_tokens in (100_000, 500_000):
        out = build_contexts(CorpusConfig(n_tokens=n_tokens, seed=seed), tok)
        prose, total = _prose_tokens(out, len(docs))
        taken = out.doc_ids[out.doc_ids >= 0].unique().tolist()
        longest = max(len(tok(every[i], add_special_tokens=False)["input_ids"]) for i in taken)
        assert abs(prose - PROSE_SHARE * total) <= max(PROSE_SHARE, 1 - PROSE_SHARE) * longest
        assert prose > 0 and prose < total
    assert abs(prose / total - PROSE_SHARE) < 0.02


@needs_tokenizer
def test_same_seed_same_contexts_and_the_parts_compose(tok) -> None:
    config = CorpusConfig(ctx_len=64, n_tokens=30_000, seed=5)
    a, b = build_contexts(config, tok), build_contexts(config, tok)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.doc_ids, b.doc_ids)
    assert a.fingerprint == b.fingerprint
    other = build_contexts(dataclasses.replace(config, seed=6), tok)
    assert not torch.equal(a.tokens, other.tokens) and a.fingerprint != other.fingerprint
    # the mix takes each part in the order its own source has under the same seed
    n_docs = len(list(iter_documents(CorpusConfig(EMBEDDED_DOCS))))
    order = _doc_order(a)
    part_orders = {}
    for name in (EMBEDDED_DOCS, EMBEDDED_PROSE):
        alone = build_contexts(dataclasses.replace(config, source=name, n_tokens=200_000), tok)
        part_orders[name] = _doc_order(alone)
    docs_seen = [d for d in order if d < n_docs]
    prose_seen = [d - n_docs for d in order if d >= n_docs]
    assert docs_seen == part_orders[EMBEDDED_DOCS][: len(docs_seen)]
    assert prose_seen == part_orders[EMBEDDED_PROSE][: len(prose_seen)]
    assert len(docs_seen) > 1 and len(prose_seen) > 1
    assert order[0] >= n_docs  # ties go to prose: the first document is prose


def test_documents_of_each_name() -> None:
    docs = list(iter_documents(CorpusConfig(EMBEDDED_DOCS)))
    prose = list(iter_documents(CorpusConfig(EMBEDDED_PROSE)))
    assert prose == list(prose_documents()) and len(docs) > 300
    assert list(iter_documents(CorpusConfig(EMBEDDED))) == docs + prose
    assert CorpusConfig().source == EMBEDDED == "embedded"


@needs_tokenizer
def test_embedded_docs_is_the_old_corpus_and_the_fingerprint_moved(tok, tmp_path) -> None:
    """`embedded-docs` packs Python's documentation as every other source is packed (the
    old embedded corpus); the new `embedded` fingerprint differs from the one the old rule
    gave under the name "embedded" (config, then tokens)."""
    docs = list(iter_documents(CorpusConfig(EMBEDDED_DOCS)))
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    config = CorpusConfig(EMBEDDED_DOCS, ctx_len=128, n_tokens=20_000, seed=1)
    named = build_contexts(config, tok)
    from_file = build_contexts(dataclasses.replace(config, source=str(path)), tok)
    assert torch.equal(named.tokens, from_file.tokens)
    assert torch.equal(named.doc_ids, from_file.doc_ids)
    old_config = dataclasses.replace(config, source=EMBEDDED)
    new = build_contexts(old_config, tok)
    assert new.fingerprint != _old_fingerprint(old_config, named.tokens)
    assert not torch.equal(new.tokens, named.tokens)
    # the name's rule is hashed too; other sources keep the fingerprint they had
    assert named.fingerprint != _old_fingerprint(config, named.tokens)
    file_config = dataclasses.replace(config, source=str(path))
    assert from_file.fingerprint == _old_fingerprint(file_config, from_file.tokens)


def _old_fingerprint(config: CorpusConfig, tokens: torch.Tensor) -> str:
    """The fingerprint before prose: the config's JSON, then the tokens."""
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True).encode())
    digest.update(tokens.numpy().tobytes())
    return digest.hexdigest()
