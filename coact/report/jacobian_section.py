"""The layer page's sections on the block's own Jacobian: the connector-free linearity
score beside d(j) for the MLP (and, in a block run, for attention at the same position),
the three-way agreement of strong connections with the reasons a first-order prediction
misses, and "How far to trust this" (control, power, agreement, convergence) gathered in
one place."""

from __future__ import annotations

from coact.jacobian.stage import JacobianResult
from coact.report.markdown import md_table, note
from coact.rundir.read import RunData

CONVERGENCE = "the project's docs, Convergence (analyses/convergence.py)"


def jacobian_section(data: RunData) -> list[str]:
    out = ["## The block's own Jacobian", ""]
    j = data.jacobian
    if j is None:
        text = "The jacobian stage did not run: `coact analyze` runs it by default."
        return [*out, note(text), ""]
    out += [
        f"The MLP between the two SAEs, run by the model's own modules with the input SAE's "
        f"error held fixed, differentiated per token on {j.tokens:,} held-out tokens "
        f"({j.contexts} contexts). Per output feature, the share of its first-order account "
        "Σᵢ Jⱼᵢ(t)·cᵢ(t) that one slope per connection (each slope averaged over every token "
        "where its input fires) misses: 0 for a block linear in the features, large for a "
        f"gated one. Linear when the 95 % upper bound (contexts resampled) is ≤ "
        f"{100 * j.max_nonlinearity:g} %, nonlinear when the lower bound is above.",
        "",
        _verdicts(j),
        "",
    ]
    return out + _agreement(data) + _attention(data)


def _verdicts(j: JacobianResult) -> str:
    return md_table(
        ["verdict", "share of scored features"],
        [
            ["linear", f"{100 * j.share_linear:.1f}%"],
            ["nonlinear", f"{100 * j.share_nonlinear:.1f}%"],
            ["uncertain", f"{100 * j.share_uncertain:.1f}%"],
            ["features scored", f"{j.features_scored:,}"],
            ["median share missed", f"{100 * j.median_nonlinearity:.0f}%"],
        ],
    )


def _attention(data: RunData) -> list[str]:
    """Attention's own Jacobian at the same position (block runs with attention_jacobian)."""
    block = data.summary.block if data.summary is not None else None
    j = block.attention_jacobian if block is not None else None
    if j is None:
        return []
    return [
        f"### Attention's own Jacobian ({j.in_site} → {j.out_site})",
        "",
        f"The same score for attention at the same position, on {j.tokens:,} held-out "
        f"tokens: each token's stream moves (its query, key and value with it) while every "
        "other position's stream, and so every earlier key and value, stays as the model "
        "computed it: the slopes are attention's response to the token's own features. What "
        "earlier positions add is the position score's question (Attention, below).",
        "",
        _verdicts(j),
        "",
    ]


def _agreement(data: RunData) -> list[str]:
    a = data.jacobian.agreement if data.jacobian is not None else None
    if a is None:
        return [note("No three-way agreement: it needs calibrate's causal check."), ""]
    rows = [
        ["connector formula", _pct(a.connector_sign), _pct(a.connector_size),
         f"{a.connector_spearman:.2f}"],
        ["mean Jacobian", _pct(a.jacobian_sign), _pct(a.jacobian_size),
         f"{a.jacobian_spearman:.2f}"],
    ]  # fmt: skip
    return [
        "### Three-way agreement of strong connections",
        "",
        f"On the {a.judged} strong connections the causal check judged: each prediction of "
        "the model's response to ablating the input against the response itself.",
        "",
        md_table(["prediction", "sign agrees", "size within 2×", "rank correlation"], rows),
        "",
        f"The connector's weight and the mean Jacobian agree in sign on "
        f"{_pct(a.weight_jacobian_sign)} and in size on {_pct(a.weight_jacobian_size)} "
        f"(Spearman {a.weight_jacobian_spearman:.2f}). Where the Jacobian misses, measured: "
        f"its first-order prediction agrees in size with the exact map's change of the "
        f"pre-activation on {_pct(a.first_order_size)} (the rest is the block's curvature), "
        f"and that with the output code's change on {_pct(a.threshold_size)} (the rest is "
        f"the output SAE's threshold switching features on or off). The exact map reproduces "
        f"the model's own ablation on {_pct(a.map_matches_ablation)} of them.",
        "",
    ]


def trust_section(data: RunData) -> list[str]:
    """Control, power, agreement and convergence, each in one line with its verdict."""
    out = ["## How far to trust this", ""]
    summary = data.summary
    control = summary.control if summary is not None else None
    if control is None:
        out.append("- **Control**: none in this run (`--control`); no headline is checked "
                   "against a re-initialised model.")  # fmt: skip
    else:
        weak = [f.label for f in control.figures.values() if not f.informative]
        out.append(
            f"- **Control**: {len(control.figures) - len(weak)} of {len(control.figures)} "
            "headlines differ from the re-initialised model's"
            + (f"; uninformative: {', '.join(weak)}" if weak else "")
            + " (table above)."
        )
    power = data.calibrate.power if data.calibrate is not None else None
    if power is None:
        out.append("- **Power of τ**: not measured (calibrate did not run).")
    else:
        verdict = "powered" if power.powered else f"**underpowered**: {power.shortfall()}"
        out.append(
            f"- **Power of τ**: extra ΔCE {power.extra_delta_ce:+.4f} ± {power.halfwidth:.4f} "
            f"nats on {power.n_contexts_used} contexts; {verdict}."
        )
    a = data.jacobian.agreement if data.jacobian is not None else None
    out.append(
        "- **Agreement with the model**: not measured."
        if a is None
        else f"- **Agreement with the model**: the mean Jacobian predicts the size of "
        f"{_pct(a.jacobian_size)} of {a.judged} ablations, the connector's formula "
        f"{_pct(a.connector_size)}."
    )
    settle = f"- **Convergence**: how these figures move as the budgets double is in {CONVERGENCE}."
    return [*out, settle, ""]


def _pct(value: float) -> str:
    return "–" if value != value else f"{100 * value:.0f}%"
