"""Feature evidence from the code store: top activating contexts (the tokens around each
maximum, the activating token marked, activation shown by colour), activation histograms,
co-activations of a feature's inputs, the decode function that turns ids into text, and
the top tokens `connect` stored per feature."""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp

from coact.codes.store import CodeStore
from coact.rundir.files import read_json
from coact.rundir.layout import RunLayout

Decode = Callable[[list[int]], str]
COLOUR = (255, 127, 14)  # activation colour (orange); alpha is activation / the feature's max


def default_decode(run_dir: str | Path, top_tokens: pl.DataFrame | None = None) -> Decode:
    """The run's tokenizer when it is on this machine (tiny test models, the cached embedded
    SmolLM2, a local model directory, a hub model already cached), never fetched; otherwise
    the token texts `connect` stored in top_tokens.parquet, and `⟨id⟩` for the rest."""
    known: dict[int, str] = {}
    if top_tokens is not None and "token" in top_tokens.columns:
        for token_id, text in top_tokens.select("token_id", "token").unique().iter_rows():
            if text is not None:
                known[int(token_id)] = str(text)
    tokenizer = _local_tokenizer(Path(run_dir))
    if tokenizer is not None:
        return lambda ids: str(tokenizer.decode(ids))
    return lambda ids: "".join(known.get(int(i), f"⟨{int(i)}⟩") for i in ids)


def _local_tokenizer(run_dir: Path) -> Any:
    """The tokenizer of the run's model where it is on this machine, else None."""
    config = read_json(RunLayout(run_dir, run_dir).config) or {}
    model = str(config.get("model", ""))
    try:
        from coact.models.load import EMBEDDED, TINY_MODELS, cache_dir, tiny_tokenizer

        if model in TINY_MODELS:
            return tiny_tokenizer()
        from transformers import AutoTokenizer

        if model in ("embedded", EMBEDDED):
            local = cache_dir() / "models" / "smollm2-135m-instruct"
            if (local / "tokenizer_config.json").is_file():
                return AutoTokenizer.from_pretrained(str(local))
            return None
        if model:
            return AutoTokenizer.from_pretrained(model, local_files_only=True)
    except Exception:  # any failure to find a tokenizer offline falls back to stored texts
        return None
    return None


@dataclass(frozen=True)
class Context:
    """A window of one context around a token where a feature fires."""

    context: int
    position: int  # of the activating token
    doc: int
    activation: float  # at the activating token
    tokens: list[str]
    values: list[float]  # the feature's activation at each token of the window
    marked: int  # index of the activating token in `tokens`


class Evidence:
    """Reads a run's code store once and answers per-feature questions from it."""

    def __init__(self, store: CodeStore | str | Path, decode: Decode) -> None:
        self.store = store if isinstance(store, CodeStore) else CodeStore.open(store)
        tokens = self.store.read_tokens()
        self.n_tokens = tokens.height
        self._context = tokens["context"].to_numpy().astype(np.int64)
        self._position = tokens["position"].to_numpy().astype(np.int64)
        self._doc = tokens["doc"].to_numpy().astype(np.int64)
        self._ids = tokens["token_id"].to_numpy().astype(np.int64)
        # the store writes contexts in order, each contiguous: its rows are [start, end)
        self._sorted = bool(np.all(np.diff(self._context) >= 0))
        self._csc: dict[str, sp.csc_matrix] = {}
        self._decode = decode
        self._text: dict[int, str] = {}

    def codes(self, slug: str) -> sp.csc_matrix:
        """The site's codes, column-major (one feature's tokens are one slice)."""
        if slug not in self._csc:
            csc = sp.csc_matrix(self.store.read_site(slug))
            csc.sort_indices()
            self._csc[slug] = csc
        return self._csc[slug]

    def column(self, slug: str, feature: int) -> tuple[np.ndarray, np.ndarray]:
        """(token rows, activations) where the feature is non-zero, rows ascending."""
        csc = self.codes(slug)
        lo, hi = csc.indptr[feature], csc.indptr[feature + 1]
        return csc.indices[lo:hi].astype(np.int64), csc.data[lo:hi].astype(np.float64)

    def activations(self, slug: str, feature: int) -> np.ndarray:
        """The feature's non-zero activations over every stored token."""
        return self.column(slug, feature)[1]

    def text(self, token_id: int) -> str:
        """A token's text, decoded once per id."""
        if token_id not in self._text:
            self._text[token_id] = self._decode([token_id])
        return self._text[token_id]

    def _window(self, row: int, before: int, after: int) -> tuple[int, int]:
        """The rows [lo, hi) around `row`, never crossing into another context."""
        ctx = self._context[row]
        if self._sorted:
            start = int(np.searchsorted(self._context, ctx, "left"))
            end = int(np.searchsorted(self._context, ctx, "right"))
        else:  # pragma: no cover - the store always writes contexts in order
            same = np.flatnonzero(self._context == ctx)
            start, end = int(same.min()), int(same.max()) + 1
        return max(start, row - before), min(end, row + after + 1)

    def top_contexts(
        self, slug: str, feature: int, k: int = 8, before: int = 12, after: int = 4
    ) -> list[Context]:
        """The k largest activations, at most one per context, each with its window."""
        rows, values = self.column(slug, feature)
        order = np.argsort(-values, kind="stable")
        out: list[Context] = []
        seen: set[int] = set()
        for i in order:
            row = int(rows[i])
            ctx = int(self._context[row])
            if ctx in seen:
                continue
            seen.add(ctx)
            lo, hi = self._window(row, before, after)
            at = np.searchsorted(rows, np.arange(lo, hi))
            hit = (at < len(rows)) & (rows[np.minimum(at, len(rows) - 1)] == np.arange(lo, hi))
            window = np.where(hit, values[np.minimum(at, len(rows) - 1)], 0.0)
            out.append(
                Context(
                    context=ctx,
                    position=int(self._position[row]),
                    doc=int(self._doc[row]),
                    activation=float(values[i]),
                    tokens=[self.text(int(t)) for t in self._ids[lo:hi]],
                    values=[float(v) for v in window],
                    marked=row - lo,
                )
            )
            if len(out) == k:
                break
        return out

    def coactive(
        self,
        in_slug: str,
        out_slug: str,
        inputs: Sequence[int],
        target: int,
        max_points: int = 1000,
    ) -> tuple[pl.DataFrame, int]:
        """Tokens where any input or the target is active: their values (columns `in i`
        and `out j`, code units), at most max_points evenly spaced over the store; and how
        many such tokens there are in all."""
        x, y = self.codes(in_slug), self.codes(out_slug)
        cols = sp.hstack([x[:, list(inputs)], y[:, [target]]]).tocsr()
        rows = np.flatnonzero(np.diff(cols.indptr) > 0)
        total = len(rows)
        if total > max_points:
            rows = rows[np.linspace(0, len(rows) - 1, max_points).astype(int)]
        dense = cols[rows].toarray()
        data = {f"in {i}": dense[:, k] for k, i in enumerate(inputs)}
        data[f"out {target}"] = dense[:, -1]
        return pl.DataFrame(data), total


def _shown(token: str) -> str:
    """A token as it reads in a line of text: newlines and tabs visible, HTML escaped."""
    return html.escape(token.replace("\n", "↵").replace("\t", "⇥").replace("\r", ""))


Effects = dict[int, float]  # tokens before the activating one → share of it lost when ablated
ABLATE = (31, 119, 180)  # context-ablation colour (blue underline); alpha is the share lost


def context_html(ctx: Context, vmax: float, effects: Effects | None = None) -> str:
    """One context as inline spans: background alpha = activation / vmax, the activating
    token outlined and bold, each token's activation in its tooltip; `effects` (context
    ablation) underlines each preceding token by the share of the activation lost when it
    is ablated."""
    r, g, b = COLOUR
    parts = []
    for i, (token, value) in enumerate(zip(ctx.tokens, ctx.values, strict=True)):
        alpha = 0.0 if vmax <= 0 else max(0.0, min(1.0, value / vmax))
        style = f"background:rgba({r},{g},{b},{alpha:.2f})" if value else ""
        cls = "coact-tok"
        title = f"activation {value:.3g}" if value else ""
        if i == ctx.marked:
            cls += " coact-max"  # outlined and bold by the style sheet
        lost = (effects or {}).get(ctx.marked - i) if i < ctx.marked else None
        if lost is not None and lost == lost:  # NaN: the clean activation was 0
            share = max(0.0, min(1.0, lost))
            shadow = "box-shadow:inset 0 -3px rgba({},{},{},{:.2f})".format(*ABLATE, share)
            style = f"{style};{shadow}" if style else shadow
            title = "; ".join(t for t in (title, f"ablating it loses {100 * lost:.0f}%") if t)
        attrs = f' style="{style}"' if style else ""
        attrs += f' title="{title}"' if title else ""
        parts.append(f'<span class="{cls}"{attrs}>{_shown(token)}</span>')
    return '<span class="coact-context">' + "".join(parts) + "</span>"


def context_lines(
    contexts: Sequence[Context],
    vmax: float,
    label: str,
    effects: Sequence[Effects] | None = None,
) -> str:
    """Top contexts as full-width lines, one per context: rank and activation, then the
    text with the activating token outlined (`effects`: per context, its ablation shading)."""
    if not contexts:
        return f"<p><em>{html.escape(label)} is never active in the stored tokens.</em></p>"
    lines = []
    for rank, c in enumerate(contexts):
        where = f"doc {c.doc}, context {c.context}, position {c.position}"
        shading = effects[rank] if effects is not None and rank < len(effects) else None
        lines.append(
            f'<div class="coact-line" data-rank="{rank + 1}">'
            f'<span class="coact-meta" title="{where}">'
            f'<span class="coact-rank">{rank + 1}</span>'
            f'<span class="coact-act">{c.activation:.3g}</span></span>'
            f"{context_html(c, vmax, shading)}</div>"
        )
    return '<div class="coact-contexts">' + "".join(lines) + "</div>"


class TokenText:
    """A feature's top tokens as stored by `connect` (top_tokens.parquet), e.g.
    `' call' ×4, 'call'`, HTML escaped."""

    def __init__(self, *top_tokens: pl.DataFrame | None) -> None:
        self.groups: dict[tuple[str, int], list[str]] = {}
        for table in top_tokens:
            if table is None:
                continue
            for r in table.sort(["feature", "rank"]).iter_rows(named=True):
                slug = str(r.get("site") or "")
                text = r.get("token")
                shown = repr(text) if text is not None else f"⟨{r['token_id']}⟩"
                self.groups.setdefault((slug, int(r["feature"])), []).append(shown)

    def __call__(self, slug: str, feature: int) -> str:
        """The feature's top tokens, repeats counted (`×n`); '–' when none are stored."""
        tokens = self.groups.get((slug, int(feature)))
        if not tokens:
            return "–"
        counts: dict[str, int] = {}
        for t in tokens:
            counts[t] = counts.get(t, 0) + 1
        return ", ".join(html.escape(t) + (f" ×{n}" if n > 1 else "") for t, n in counts.items())
