"""The layer page's residual composition (block runs): the next residual stream's features
as a sparse mix of the block's three sources' features, each source's share of their
variance, the decoded checks in activation space, and the layer graphs of the next-stream
features the MLP writes most into."""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from coact.block.composition import CompositionResult
from coact.models.sites import Site
from coact.report.charts import block as block_charts
from coact.report.charts import connect as connect_charts
from coact.report.embed import Figures
from coact.report.layer_graphs import GraphWriter
from coact.report.markdown import md_table, note, num, pct
from coact.report.outlier_marks import outlier_text
from coact.rundir.read import RunData

DECODED = {
    "identity_raw": "the block's exact identity on raw activations: near 0 says the sites "
    "are captured right",
    "identity_decoded": "the same sum, each source replaced by its SAE's reconstruction: the "
    "error the three source SAEs add together",
    "composition_decoded": "the next stream's SAE decoding the composition connector's "
    "predicted codes: how much of the stream the feature-level composition gives back",
    "target_sae": "the next stream's SAE reconstructing it: the floor the decoded composition "
    "cannot beat",
}


def composition_section(data: RunData, fig: Figures, graphs: GraphWriter | None) -> list[str]:
    """The next residual stream's features from the block's three sources: fit, variance
    share per source, the decoded checks and a few next-stream features' graphs."""
    c = data.composition
    out = ["## Residual composition", ""]
    if c is None:
        return [
            *out,
            note("The residual composition was not fitted: `coact analyze --block` fits it."),
            "",
        ]
    sources = [str(s) for s in c.sources]
    out += _fit_part(c, sources)
    out += _charts(data, c, fig, sources)
    if data.decoded is not None and data.decoded.height:
        out += _decoded_part(data.decoded)
    if graphs is not None and data.composition_table is not None:
        out += _next_stream_graphs(data, fig, graphs, sources, c.target)
    return out


def _fit_part(c: CompositionResult, sources: Sequence[str]) -> list[str]:
    """What is fitted and how, its R² on held-out and training tokens, and the variance
    share each source explains."""
    target = c.target
    per_source = ", ".join(f"{k} {v:.1f}" for k, v in c.weights_per_output_by_source.items())
    shares = {
        "least squares, training tokens": c.variance_share_ls,
        "least squares, held-out tokens": c.variance_share_ls_heldout,
        "sparse refit, training tokens": c.variance_share_refit,
    }
    r2 = [
        ["sparse (chosen α)", "held-out tokens", num(c.r2_sparse)],
        ["sparse, refitted by least squares", "held-out tokens", num(c.r2_refit)],
        ["least squares on every input", "held-out tokens", num(c.r2_ls)],
        ["least squares on every input", "training tokens", num(c.r2_ls_train)],
    ]
    return [
        f"`{target}` = `{'` + `'.join(sources)}` holds exactly in activations; here each "
        f"`{target}` feature is fitted as a sparse linear mix of the sources' features (exact "
        f"L1 path on their codes side by side, refitted on the chosen support), with least "
        f"squares on every input as the ceiling. Chosen α = {c.alpha:.3g} (elbow, "
        f"{c.alpha_index + 1} of {c.n_alphas}), {c.weights_per_output:.1f} weights per "
        f"feature ({per_source}); {c.alive:,} alive and {c.dead:,} dead features; "
        f"{c.tokens_train:,} training and {c.tokens_heldout:,} held-out tokens.",
        "",
        md_table(["fit", "measured on", "R²"], r2),
        "",
        "R² is the mean over alive features of 1 − MSE / variance; a least-squares fit far "
        "better on training than on held-out tokens overfits its many inputs.",
        "",
        md_table(
            ["variance share (mean over features)", *[f"`{s}`" for s in sources]],
            [[name, *(num(v.get(s)) for s in sources)] for name, v in shares.items()],
        ),
        "",
    ]


def _charts(data: RunData, c: CompositionResult, fig: Figures, sources: list[str]) -> list[str]:
    """Each feature's variance split among the sources, and the composition's α sweep."""
    out = []
    if data.composition_table is not None:
        out.append(
            fig.figure(
                block_charts.composition_shares(data.composition_table, sources, c.target),
                "composition-shares",
                "Read: the colours split what the fit explains of each feature among the "
                "sources; a wide block of one colour means many features come mostly from "
                "that source, a short stack means the features are poorly explained.",
            )
        )
    if data.composition_sweep is not None and data.composition_sweep.height:
        out.append(
            fig.figure(
                connect_charts.lasso_path(
                    data.composition_sweep, c.tokens_heldout, "Residual composition"
                ),
                "composition-lasso-path",
                "Read: the chosen α (dashed) sits where the held-out loss stops falling; "
                "left of it more weights fit noise.",
            )
        )
    return out


def _decoded_part(decoded: pl.DataFrame) -> list[str]:
    """The decoded checks: how much of the true next stream each reconstruction misses."""
    rows = [
        [
            f"`{r['check']}`",
            DECODED.get(str(r["check"]), str(r.get("what") or "")),
            num(r["fvu"], ".4g"),
            num(r["tokens"]),
        ]
        for r in decoded.iter_rows(named=True)
    ]
    return [
        "",
        "### Decoded checks (activation space)",
        "",
        md_table(["check", "what is compared with the true next stream", "FVU", "tokens"], rows),
        "",
        "FVU: the fraction of the true next stream's variance (about its mean) left "
        "unexplained, on raw activations of the evaluation contexts.",
        "",
    ]


def _readable(data: RunData, kind: str) -> set[int]:
    """Next-stream features the graph can follow through the MLP: some MLP feature that
    writes them has inputs in the MLP's connector (many next-stream features merely copy
    one MLP feature that the sparse connector leaves without inputs)."""
    cw = data.composition_weights
    if cw is None or data.weights is None or not data.weights.height:
        return set()
    names = [n for n in cw["source_site"].unique().to_list() if Site.parse(n).kind == kind]
    read = data.weights["output"].unique().to_list()
    chosen = cw.filter(pl.col("source_site").is_in(names) & pl.col("in_feature").is_in(read))
    return set(chosen["out_feature"].to_list())


def _next_stream_graphs(
    data: RunData,
    fig: Figures,
    graphs: GraphWriter,
    sources: Sequence[str],
    target: str,
    count: int = 3,
) -> list[str]:
    """Layer graphs of the next-stream features the MLP writes most into."""
    table = data.composition_table
    assert table is not None
    mlp = [s for s in sources if Site.parse(s).kind == "mlp_out"]
    if not mlp:
        return []
    kind = Site.parse(mlp[0]).kind
    key = f"share_refit_{kind}" if f"share_refit_{kind}" in table.columns else f"share_ls_{kind}"
    ranked = (
        table.filter(pl.col("status") != "dead")
        .filter(pl.col(key).is_finite())
        .sort([key, "feature"], descending=[True, False])
    )
    preferred = ranked.filter(pl.col("feature").is_in(list(_readable(data, kind)))).head(count)
    rest = ranked.filter(~pl.col("feature").is_in(preferred["feature"].to_list()))
    chosen = pl.concat([preferred, rest.head(count - preferred.height)])
    if not chosen.height:
        return []
    slug = Site.parse(target).slug
    out = [
        "### Layer graphs of the next stream's features",
        "",
        f"The {chosen.height} `{target}` features with the largest share from `{mlp[0]}` "
        "(sparse refit) among those written by an MLP feature that has inputs in the MLP's "
        "sparse connector, each with the features that feed it through the block, two hops "
        "back.",
        "",
    ]
    for r in chosen.iter_rows(named=True):
        j = int(r["feature"])
        out += [
            f"#### `{target}` #{j}{outlier_text(data, slug, j)}: "
            f"{pct(r[key])} of its variance from the MLP",
            "",
        ]
        out += graphs.section(data, target, j, "in", fig, f"graph-{slug.replace('.', '-')}-{j}")
    return out
