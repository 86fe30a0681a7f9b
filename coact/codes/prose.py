"""The prose that ships with coact: WikiText-2, the part of the embedded corpus that is not
Python's documentation.

`coact/data/wikitext2.txt.gz` is WikiText-2's raw validation split followed by its raw test
split, byte for byte (Merity et al. 2016, from Wikipedia's Good and Featured articles;
CC BY-SA 3.0, see `coact/data/WIKITEXT2-NOTICE.md` beside it). The study's examples
("former / old / young", "said" after a quote) are prose phenomena that documentation
rarely shows.

Reading it here changes two things, both undone cheaply and both stated in the notice:
the text is split into one document per article at WikiText's article headings
(` = Title = `; sections are ` = = Section = = `), and WikiText's tokenization spaces are
taken out (`detokenize`), so the model sees text shaped like what it was trained on rather
than ` 3 @.@ 5 kg , " he said .`. Rare words stay `<unk>`, as WikiText has them.
"""

from __future__ import annotations

import functools
import gzip
import re
from collections.abc import Iterable
from pathlib import Path

PROSE_FILE = "wikitext2.txt.gz"
NOTICE_FILE = "WIKITEXT2-NOTICE.md"
DATA_DIR = Path(__file__).resolve().parent.parent / "data"

_ARTICLE = re.compile(r"^ = ([^=].*?) = $")  # ` = Title = `, not ` = = Section = = `
_SECTION = re.compile(r"^ (?:= )+(.*?)(?: =)+ $")
_NUMBER_JOINS = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))
_SPACE_BEFORE = re.compile(r" ([,.;:!?)\]%])")
_SPACE_AFTER = re.compile(r"([(\[]) ")
_CONTRACTION = re.compile(r"(?<=\S) '(s|re|ve|ll|d|m|t)\b")


def prose_path() -> Path:
    """The shipped file (package data: present in the wheel, the sdist and a checkout)."""
    return DATA_DIR / PROSE_FILE


@functools.cache
def prose_documents() -> tuple[str, ...]:
    """The shipped articles, detokenized, in file order (cached: reading takes ~1 s)."""
    with gzip.open(prose_path(), "rt", encoding="utf-8") as lines:
        return tuple(detokenize_article(a) for a in split_articles(lines))


def split_articles(lines: Iterable[str]) -> list[list[str]]:
    """WikiText lines grouped into articles: each starts at a ` = Title = ` line after a
    blank one (two formulas inside an article also read ` = ... = `, but follow text).
    Lines before the first heading belong to no article and are dropped."""
    articles: list[list[str]] = []
    previous = ""
    for line in lines:
        line = line.rstrip("\n")
        if _ARTICLE.match(line) and not previous.strip():
            articles.append([line])
        elif articles:
            articles[-1].append(line)
        previous = line
    return articles


def detokenize_article(lines: list[str]) -> str:
    """One article as plain text: title, section titles and paragraphs, separated by blank
    lines, with WikiText's tokenization spaces removed."""
    parts: list[str] = []
    for line in lines:
        if not line.strip():
            continue
        heading = _SECTION.match(line)
        parts.append(detokenize(heading.group(1) if heading else line.strip()))
    return "\n\n".join(parts)


def detokenize(text: str) -> str:
    """Undo WikiText's spacing in one paragraph: `3 @.@ 5` → `3.5`, `word ,` → `word,`,
    `( x )` → `(x)`, `it 's` → `it's`, and `" quoted "` → `"quoted"` when the paragraph's
    double quotes pair up (an odd count is left alone: which one is open is unknown)."""
    for spaced, joined in _NUMBER_JOINS:
        text = text.replace(spaced, joined)
    text = _SPACE_BEFORE.sub(r"\1", text)
    text = _SPACE_AFTER.sub(r"\1", text)
    text = _CONTRACTION.sub(r"'\1", text)
    pieces = text.split('"')
    if len(pieces) % 2 == 1:  # an even number of quotes: odd pieces are quoted
        pieces[1::2] = [piece.strip() for piece in pieces[1::2]]
        text = '"'.join(pieces)
    return text
