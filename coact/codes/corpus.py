"""The corpus stage: text → fixed-length token contexts, deterministic given a seed.

Documents are shuffled within a bounded buffer (so streamed datasets stay streamed), joined
with the end-of-text token and cut into contexts that each start with BOS. A document longer
than a context continues into the next one: nothing is truncated to nothing.

Sources: "embedded" (offline: Python's documentation and shipped prose, mixed by the rule
below), "embedded-docs" (Python's documentation alone: the embedded corpus before prose was
added), "embedded-prose" (the prose alone: WikiText-2, CC BY-SA 3.0, `coact.codes.prose`), a
text file (one document), a `.jsonl` file (one document per line), a folder of
`.txt`/`.md`/`.jsonl` files, a folder written by `datasets` `save_to_disk`, or a Hugging Face
dataset id (`id` or `id:config`).

The mixing rule of "embedded": each part is shuffled as its own source is with the seed
("embedded-docs", "embedded-prose"), then the two are interleaved a whole document at a
time: the next document is prose while prose holds at most PROSE_SHARE (one half) of the
document tokens taken so far (ties go to prose, so the first one is prose), else
documentation. So at every point of the stream, prose tokens − PROSE_SHARE × all document
tokens (EOS and BOS are not counted) lies between −PROSE_SHARE and 1 − PROSE_SHARE times the
longest document taken (documents run to ~21k tokens; measured with the GPT-NeoX tokenizer,
the share is 0.50 ± 0.04 at 100k tokens and ± 0.006 at the default run's 500k). When a part
runs out the other continues alone (the parts hold ~580k and ~530k GPT-NeoX tokens).
Document indices (`Contexts.doc_ids`) count the documentation first, then the prose:
`iter_documents` yields them in that order.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import random
import sysconfig
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from coact.codes.prose import prose_documents
from coact.errors import CoactError
from coact.progress import tqdm

EMBEDDED = "embedded"  # documentation and prose, mixed by the rule above
EMBEDDED_DOCS = "embedded-docs"  # Python's documentation alone (the old embedded corpus)
EMBEDDED_PROSE = "embedded-prose"  # WikiText-2 alone
PROSE_SHARE = 0.5  # of the embedded corpus's document tokens
# What a source's name stands for, hashed into its fingerprint: a changed rule never passes
# for the old one, even where the tokens happen to agree.
_EMBEDDED_RULES = {
    EMBEDDED: f"python docs + wikitext-2 articles, greedy prose share {PROSE_SHARE}",
    EMBEDDED_DOCS: "python docs",
    EMBEDDED_PROSE: "wikitext-2 articles, detokenized",
}

TEXT_SUFFIXES = (".txt", ".md", ".jsonl")
_DATASET_MARKERS = ("state.json", "dataset_info.json", "dataset_dict.json")  # save_to_disk
_DOC_NODES = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class CorpusConfig:
    """Which text (`source`: "embedded", "embedded-docs", "embedded-prose", a path or a hub
    id; the module docstring says what each is) becomes how many contexts of what length."""

    source: str = EMBEDDED
    ctx_len: int = 128
    n_tokens: int = 200_000  # tokens wanted, BOS excluded
    seed: int = 0
    text_column: str = "text"
    split: str = "train"
    prepend_bos: bool = True
    shuffle_buffer: int = 1000  # documents held for shuffling: bounded so streams stay streams


@dataclass
class Contexts:
    """Token contexts and, per token, the index of its document (−1 for BOS and EOS)."""

    tokens: torch.Tensor  # (n_ctx, ctx_len) int64
    doc_ids: torch.Tensor  # (n_ctx, ctx_len) int32
    source: str
    fingerprint: str
    n_documents: int  # documents with tokens in these contexts
    has_bos: bool = True  # whether column 0 is the BOS token

    @property
    def n_tokens(self) -> int:  # all but BOS: document tokens and EOS separators
        return self.tokens.numel() - (self.tokens.shape[0] if self.has_bos else 0)


@functools.cache
def _python_docs() -> tuple[str, ...]:
    """Python's own documentation: the pydoc topics, then one document per stdlib module made
    of its module, class and function docstrings (~570k GPT-NeoX tokens; topics and module
    docstrings alone are ~180k, under the default n_tokens). Files are parsed, never imported:
    `antigravity` would open a browser. Cached: parsing the stdlib takes a second or two."""
    from pydoc_data.topics import topics

    documents = [topics[name] for name in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]  # never walk into site-packages
        files += [Path(root, n) for n in names if n.endswith(".py")]
    for path in sorted(files):
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, OSError):
            continue
        parts = [doc for doc in _docstrings(tree) if doc and doc.strip()]
        if parts:
            documents.append("\n\n".join(parts))
    return tuple(documents)


def _docstrings(node: Any) -> Iterator[str | None]:
    """Docstrings of a module and its (nested) classes and functions, in source order."""
    yield ast.get_docstring(node)
    for child in node.body:
        if isinstance(child, _DOC_NODES):
            yield from _docstrings(child)


def _file_documents(path: Path, text_column: str) -> Iterator[str]:
    """A file is one document, except `.jsonl`: one JSON object per line (read lazily)."""
    try:
        if path.suffix != ".jsonl":
            yield path.read_text(encoding="utf-8")
            return
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)[text_column]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise CoactError(
                        f"{path}:{number} is not a JSON object with a {text_column!r} field"
                    ) from None
    except (UnicodeDecodeError, OSError) as error:
        raise CoactError(f"cannot read corpus file {path} as UTF-8 text: {error}") from None


def _dataset_documents(dataset: Any, text_column: str, name: str) -> Iterator[str]:
    columns = getattr(dataset, "column_names", None)
    if columns is not None and text_column not in columns:
        raise CoactError(f"dataset {name} has no column {text_column!r}; it has {columns}")
    for row in dataset:
        if text_column not in row:
            raise CoactError(f"dataset {name} has no column {text_column!r}; it has {list(row)}")
        yield row[text_column]


def _looks_like_path(source: str) -> bool:
    """Hub ids look like `owner/name`, so one `/` alone does not make a path."""
    return (
        source.startswith((".", "/", "~"))
        or source.count("/") > 1
        or "\\" in source
        or source.endswith(TEXT_SUFFIXES)
    )


def iter_documents(config: CorpusConfig) -> Iterator[str]:
    """Documents of `config.source`, in a deterministic order."""
    source = config.source
    if source in _EMBEDDED_RULES:
        if source != EMBEDDED_PROSE:
            yield from _python_docs()
        if source != EMBEDDED_DOCS:
            yield from prose_documents()
        return
    path = Path(source).expanduser()
    if path.is_file():
        yield from _file_documents(path, config.text_column)
        return
    if path.is_dir():
        if any((path / name).is_file() for name in _DATASET_MARKERS):
            yield from _disk_documents(path, config)
            return
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
        for file in files:
            yield from _file_documents(file, config.text_column)
        return
    if _looks_like_path(source):
        raise CoactError(f"corpus path {source} does not exist")
    yield from _hub_documents(config)


def _disk_documents(path: Path, config: CorpusConfig) -> Iterator[str]:
    import datasets

    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        if config.split not in data:
            raise CoactError(f"dataset {path} has no split {config.split!r}; it has {list(data)}")
        data = data[config.split]
    yield from _dataset_documents(data, config.text_column, str(path))


def _hub_documents(config: CorpusConfig) -> Iterator[str]:
    import datasets

    name, _, subset = config.source.partition(":")
    try:
        data = datasets.load_dataset(name, subset or None, split=config.split, streaming=True)
        yield from _dataset_documents(data, config.text_column, config.source)
    except CoactError:
        raise
    except Exception as error:  # the hub raises many types for "unreachable" and "unknown"
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CoactError(
            f"cannot stream dataset {config.source!r} from the Hugging Face hub ({first}); "
            "use a local file or folder, or 'embedded'"
        ) from None


def _shuffled(documents: Iterator[str], seed: int, buffer_size: int) -> Iterator[tuple[int, str]]:
    """Shuffle within a buffer; yields (position in the source order, text)."""
    rng = random.Random(seed)
    buffer: list[tuple[int, str]] = []
    for item in enumerate(documents):
        buffer.append(item)
        if len(buffer) >= buffer_size:
            yield buffer.pop(rng.randrange(len(buffer)))
    rng.shuffle(buffer)
    yield from buffer


def _tokenized(
    documents: Iterator[tuple[int, str]], tokenizer: Any, first: int = 0
) -> Iterator[tuple[int, list[int]]]:
    """(document index + `first`, token ids) of each non-blank text document."""
    for index, text in documents:
        if isinstance(text, str) and text.strip():
            ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
            yield first + index, ids


def _token_documents(config: CorpusConfig, tokenizer: Any) -> Iterator[tuple[int, list[int]]]:
    """The documents in the order they are packed: shuffled, or for "embedded" the two
    shuffled parts interleaved by the module's rule."""
    if config.source != EMBEDDED:
        documents = _shuffled(iter_documents(config), config.seed, config.shuffle_buffer)
        yield from _tokenized(documents, tokenizer)
        return
    seed, buffer = config.seed, config.shuffle_buffer
    docs = _python_docs()
    prose = _shuffled(iter(prose_documents()), seed, buffer)
    yield from _interleaved(
        _tokenized(_shuffled(iter(docs), seed, buffer), tokenizer),
        _tokenized(prose, tokenizer, first=len(docs)),
        PROSE_SHARE,
    )


def _interleaved(
    docs: Iterator[tuple[int, list[int]]], prose: Iterator[tuple[int, list[int]]], share: float
) -> Iterator[tuple[int, list[int]]]:
    """Whole documents from two streams: prose while its tokens are at most `share` of those
    taken so far, else docs; when one stream runs out, the other alone."""
    streams = {"docs": docs, "prose": prose}
    taken = {"docs": 0, "prose": 0}
    while streams:
        wanted = "prose" if taken["prose"] <= share * (taken["docs"] + taken["prose"]) else "docs"
        name = wanted if wanted in streams else next(iter(streams))
        item = next(streams[name], None)
        if item is None:
            del streams[name]
            continue
        taken[name] += len(item[1])
        yield item


def build_contexts(config: CorpusConfig, tokenizer: Any) -> Contexts:
    """Tokenize and pack documents into ceil(n_tokens / per-context) full contexts."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    use_bos = config.prepend_bos and bos is not None
    per_context = config.ctx_len - 1 if use_bos else config.ctx_len
    if per_context < 1 or config.n_tokens < 1:
        raise CoactError(f"ctx_len {config.ctx_len} and n_tokens {config.n_tokens} must leave room")
    n_ctx = -(-config.n_tokens // per_context)
    wanted = n_ctx * per_context
    stream: list[int] = []
    docs: list[int] = []
    seen_any = False
    bar = tqdm(total=wanted, desc=f"tokenizing {config.source}", unit="tok", disable=None)
    for doc_index, ids in _token_documents(config, tokenizer):
        seen_any = True
        if not ids:
            continue
        before = len(stream)
        if stream and eos is not None:
            stream.append(eos)
            docs.append(-1)
        stream.extend(ids)
        docs.extend([doc_index] * len(ids))
        bar.update(min(len(stream), wanted) - min(before, wanted))
        if len(stream) >= wanted:
            break
    bar.close()
    if not seen_any:
        raise CoactError(f"corpus {config.source} is empty: it has no non-blank documents")
    n_full = min(n_ctx, len(stream) // per_context)
    if n_full == 0:
        raise CoactError(
            f"corpus {config.source} has only {len(stream)} tokens, fewer than one context of "
            f"{per_context}; lower ctx_len or use a larger corpus"
        )
    kept = n_full * per_context
    body = torch.tensor(stream[:kept], dtype=torch.int64).view(n_full, per_context)
    doc_ids = torch.tensor(docs[:kept], dtype=torch.int32).view(n_full, per_context)
    if use_bos:
        body = torch.cat([torch.full((n_full, 1), bos, dtype=torch.int64), body], 1)
        doc_ids = torch.cat([torch.full((n_full, 1), -1, dtype=torch.int32), doc_ids], 1)
    digest = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode())
    digest.update(_EMBEDDED_RULES.get(config.source, "").encode())  # nothing for other sources
    digest.update(body.numpy().tobytes())
    n_documents = int(doc_ids[doc_ids >= 0].unique().numel())
    return Contexts(body, doc_ids, config.source, digest.hexdigest(), n_documents, use_bos)
