"""The layer page's metric sheet: the SAE route beside a skip transcoder at the same L0
(`coact.transcoder.stage`), one row per route, and which explains the MLP better, in words."""

from __future__ import annotations

from typing import TYPE_CHECKING

from coact.report.markdown import finite, md_table, num, pct

if TYPE_CHECKING:
    from coact.rundir.read import RunData
    from coact.transcoder.stage import SheetRow, TranscoderResult

ROUTE_NAMES = {
    "transcoder": "skip transcoder",
    "transcoder_skip": "its skip path alone",
    "sae_linear": "SAE route, linear connector",
    "sae_mlp": "SAE route, mlp connector",
    "sae_out": "output SAE's own reconstruction",
    "zero": "MLP output zero-ablated",
}


def _row(name: str, r: SheetRow) -> list[str]:
    return [
        ROUTE_NAMES.get(name, name), num(finite(r.fvu)), num(finite(r.l0), ".1f"),
        pct(finite(r.dead_fraction)), num(finite(r.delta_ce)), num(finite(r.kl)),
        pct(finite(r.ce_recovered)), num(finite(r.connections_per_output), ".1f"),
        _three(r.jacobian_sign, r.jacobian_size, r.jacobian_spearman),
        _three(r.ablation_sign, r.ablation_size, r.ablation_spearman), pct(finite(r.linear_share)),
    ]  # fmt: skip


def _three(sign: float, size: float, rho: float) -> str:
    if finite(sign) is None:
        return "–"
    return f"{pct(sign, 0)} / {pct(finite(size), 0)} / {num(finite(rho), '.2f')}"


def verdict(t: TranscoderResult) -> str:
    """Which route explains the MLP output better at the same L0, by FVU and CE recovered
    (the SAE route by its better connector), and the SAE route's ceiling."""
    tc = t.rows.get("transcoder")
    routes = [t.rows[r] for r in ("sae_linear", "sae_mlp") if r in t.rows]
    if tc is None or not routes:
        return ""
    sae = min(routes, key=lambda r: r.fvu)
    better = "the transcoder" if tc.fvu < sae.fvu else "the SAE route"
    text = (
        f"At the same k ({t.k}; active latents per token {tc.l0:.1f} for the transcoder, "
        f"{sae.l0:.1f} for the SAE route), {better} explains the MLP output "
        f"better: FVU {tc.fvu:.3f} for the transcoder against {sae.fvu:.3f} for the SAE route "
        f"({ROUTE_NAMES[sae.route]}), CE recovered {pct(finite(tc.ce_recovered))} against "
        f"{pct(finite(sae.ce_recovered))}."
    )
    if (ceiling := t.rows.get("sae_out")) is not None:
        text += (
            f" The SAE route's ceiling, the output SAE's own reconstruction, has FVU "
            f"{num(finite(ceiling.fvu))}."
        )
    return text


def transcoder_section(data: RunData) -> list[str]:
    t = data.summary.transcoder if data.summary is not None else None
    if t is None:
        return []  # opt-in (`coact analyze --transcoder`): no note where it was not asked for
    headers = [
        "route", "FVU", "L0", "dead", "ΔCE", "KL", "CE recovered", "connections / output",
        "Jacobian sign / size / ρ", "ablation sign / size / ρ", "linear share",
    ]  # fmt: skip
    trained = "trained now" if t.trained_now else "read back from an earlier run"
    return [
        "## SAE route vs skip transcoder",
        "",
        f"A skip transcoder (width {t.width:,}, k = {t.k}, the SAEs' own; {t.train_tokens:,} "
        f"training tokens, {t.train_seconds:.0f} s, {trained}) replaces the MLP in one sparse "
        "layer plus a linear skip path; the SAE route reads the input SAE's codes, predicts "
        f"the output SAE's codes with a connector and decodes them. FVU and splices on "
        f"{t.tokens:,} held-out tokens; slopes on {t.slope_tokens:,} tokens, judged on the "
        f"model's {t.connections_judged:,} strong connections (its mean Jacobian) and "
        f"{t.ablations_judged:,} ablated ones (the causal check). Connections per output: input "
        "features holding 90 % of an output's |weight| × mean input code (the transcoder's "
        "encoder read through the input SAE's decoder). Linear share: the Jacobian score with "
        "the route in the MLP's place (the model's own on the SAE rows).",
        "",
        md_table(headers, [_row(name, row) for name, row in t.rows.items()]),
        "",
        verdict(t),
        "",
        *label_table(t),
    ]


def label_table(t: TranscoderResult) -> list[str]:
    """Both routes' label counts side by side: the logic stage's for the output SAE's
    features, the same labelling for the transcoder's latents (inputs: the input SAE's
    features, candidates: its virtual weights), and the share each explains."""
    if t.labels_sae is None and t.labels_transcoder is None:
        return ["No label counts: the logic stage did not run.", ""]
    sae, tc = t.labels_sae or {}, t.labels_transcoder or {}
    rows = [[label, _count(sae, label), _count(tc, label)] for label in dict.fromkeys([*sae, *tc])]
    explained = [
        "explained (alive, ≥ coverage target)",
        *(pct(finite(c.share_explained)) if c is not None else "–"
          for c in (t.coverage_sae, t.coverage_transcoder)),
    ]  # fmt: skip
    headers = ["label", "SAE route: output SAE features", "transcoder latents"]
    return [
        "Labels by the logic stage: each output feature (the transcoder's latents likewise) "
        "named by the computation of its inputs among the input SAE's features; the "
        "transcoder's candidate inputs are its virtual weights.",
        "",
        md_table(headers, [*rows, explained]),
        "",
    ]


def _count(counts: dict[str, int], label: str) -> str:
    return f"{counts[label]:,}" if label in counts else "–"


def format_transcoder(t: TranscoderResult) -> str:
    """The sheet's headline for the text `coact analyze` prints."""
    rows = t.rows
    parts = [
        f"{ROUTE_NAMES[r]} FVU {rows[r].fvu:.3f}, CE recovered {pct(finite(rows[r].ce_recovered))}"
        for r in ("transcoder", "sae_linear", "sae_mlp", "sae_out")
        if r in rows
    ]
    labels = [
        f"{name}: " + ", ".join(f"{k} {v:,}" for k, v in counts.items() if v)
        for name, counts in (("SAE route", t.labels_sae), ("transcoder", t.labels_transcoder))
        if counts is not None
    ]
    return (
        f"  SAE route vs skip transcoder (L0 {t.k}, {t.tokens:,} held-out tokens): "
        + "; ".join(parts)
        + (f"\n  {verdict(t)}" if verdict(t) else "")
        + (f"\n  labels, {'; '.join(labels)}" if labels else "")
    )
