"""The plain-text summary printed at the end of `coact analyze` and the stage commands:
a few readable lines per stage, from the same typed results summary.json holds."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from coact.rundir.layout import RunLayout

if TYPE_CHECKING:
    from coact.block.graph import FeatureGraph
    from coact.block.stage import BlockResult
    from coact.calibrate.power import CalibrationPower
    from coact.calibrate.stage import CalibrateResult, SpliceFigures
    from coact.connectors.stage import ConnectResult
    from coact.evidence.ablation import AblationResult
    from coact.evidence.outliers import OutliersResult
    from coact.jacobian.stage import JacobianResult
    from coact.linearity.table import LinearShare
    from coact.logic.stage import LogicResult
    from coact.pipeline.summary import ModelSummary, RunSummary


def format_summary(summary: RunSummary) -> str:
    """A few readable lines; the same figures are in summary.json."""
    lines = [
        f"coact analyze: {summary.model}, layer {summary.layer}, corpus {summary.corpus}",
        f"  feature codes: {summary.tokens:,} tokens",
    ]
    lines += [f"  warning: {warning}" for warning in summary.warnings]
    for site, s in summary.sites.items():
        lines.append(
            f"  {site:<14} width {s.width:>6}  FVE {s.fve:.3f}  L0 {s.l0:.1f}  "
            f"dead {100 * s.dead_fraction:.1f}%  CE recovered {100 * s.ce_recovered:.1f}% "
            f"(clean {s.ce_clean:.3f}, spliced {s.ce_spliced:.3f}, "
            f"ablated {s.ce_ablated:.3f} nats; {s.n_tokens:,} eval tokens)"
        )
    parts = [
        (summary.connect, format_connect),
        (summary.calibrate, format_calibrate),
        (summary.jacobian, format_jacobian),
        (summary.logic, format_logic),
        (summary.block, format_block),
        (summary.outliers, format_outliers),
        (summary.ablation, format_ablation),
    ]
    lines += [write(result) for result, write in parts if result is not None]  # type: ignore[operator]
    if summary.transcoder is not None:
        from coact.report.transcoder_section import format_transcoder

        lines.append(format_transcoder(summary.transcoder))
    if summary.control is not None:
        from coact.report.control_section import format_control

        lines.append(format_control(summary.control))
    lines.append(f"  total time {summary.timings['total_s']:.0f} s")
    inside = RunLayout.of(summary.run_dir).summary.name
    lines.append(f"  run directory: {summary.run_dir}  ({inside} inside)")
    if summary.report:
        lines.append(f"  report: {summary.report}  (open it in a browser)")
    return "\n".join(lines)


def format_connect(c: ConnectResult) -> str:
    """The connectors' and the linearity table's headline lines."""
    stable = (
        ""
        if c.stable_share is None
        else f"; {100 * c.stable_share:.0f}% of them survive in both halves of the tokens"
    )
    return "\n".join(
        [
            f"  connectors {c.in_site} → {c.out_site}: chosen α {c.alpha:.3g} "
            f"(elbow, {c.alpha_index + 1} of {c.n_alphas}), held-out NMSE "
            f"{c.heldout_nmse_sparse:.3f} with {c.weights_per_output:.1f} weights per "
            f"output{stable}",
            f"  least squares NMSE {c.heldout_nmse_linear:.3f}, mlp {c.heldout_nmse_mlp:.3f} "
            f"(held out: {c.tokens_heldout:,} tokens)",
            format_share(c.share, c.tau, c.form),
            f"  tables: {c.directory}",
        ]
    )


def format_share(c: LinearShare, tau: float, form: str) -> str:
    """The percent-linear line, with its bootstrap interval and d's noise floor if known."""
    line = (
        f"  linear share: {c.percent_linear:.1f}% of {c.alive:,} alive output features "
        f"are linear at τ = {tau:g} ({form} form)"
    )
    line += f"; {c.dead:,} dead"
    if c.undecided is not None:
        line += (
            f"\n  d's noise floor (95% bootstrap over held-out contexts): "
            f"{c.confident_linear:,} linear, {c.confident_nonlinear:,} nonlinear, "
            f"{c.undecided:,} undecided, so {c.percent_linear_confident:.1f}–"
            f"{c.percent_linear_possible:.1f}% linear; the mlp gains beyond noise on "
            f"{c.mlp_gain_beyond_noise:,} features"
        )
    return line


def _splice(name: str, s: SpliceFigures) -> str:
    return (
        f"{name} ΔCE {s.delta_ce:+.3f} [{s.delta_ce_low:+.3f}, {s.delta_ce_high:+.3f}]"
        f" KL {s.kl:.3f}, {100 * s.ce_recovered:.0f}% recovered"
    )


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _power(p: CalibrationPower, site: str) -> str:
    """τ's power in one line: the site's total effect, ε's share of it, the half-width."""
    share = (
        f"ε is {100 * p.epsilon_share:.1f}% of it"
        if p.epsilon_share == p.epsilon_share  # not NaN
        else "it does not raise the loss, so ε is no share of it"
    )
    verdict = "powered (≤ ε/2)" if p.powered else f"τ is underpowered: {p.shortfall()}"
    return (
        f"  power: zeroing {site} costs {p.total_effect:+.4f} nats ({share}); extra ΔCE at τ "
        f"{p.extra_delta_ce:+.3g} ± {p.halfwidth:.3g} (95%, {p.n_contexts_used} contexts): "
        f"{verdict}"
    )


def format_calibrate(c: CalibrateResult) -> str:
    """Calibrated τ, the spliced losses, the relabelled share and the causal agreement."""
    cal, seed = c.linear_calibrated, c.linear_seed_tau
    lines = [
        f"  calibration ({c.n_contexts} held-out contexts, {c.n_tokens:,} tokens): "
        f"τ = {c.tau:.3g} ({c.form} form), the largest whose extra ΔCE over the mlp "
        f"splice stays ≤ ε = {c.tolerance:g} nats",
        *([_power(c.power, c.out_site)] if c.power is not None else []),
        f"  spliced MLP output (clean CE {c.ce_clean:.3f} nats): "
        + "; ".join(_splice(k, c.splices[k]) for k in ("sae", "linear", "mlp", "zero")),
        f"  linear share at calibrated τ: {cal.percent_linear:.1f}% of {cal.alive:,} alive "
        f"({_nan(cal.percent_linear_confident):.1f}–"
        f"{_nan(cal.percent_linear_possible):.1f}% beyond d's noise); at the "
        f"seed's τ = 0.001: {seed.percent_linear:.1f}%",
    ]
    if c.causal is not None:
        k = c.causal
        lines.append(
            f"  causal check of {k.judged:,} strong connections (input ablated in the "
            f"model): sign agrees {100 * k.share_sign_agrees:.0f}%, size within 2× "
            f"{100 * k.share_size_agrees:.0f}%, both {100 * k.share_both_agree:.0f}%"
        )
    t = c.timings
    lines.append(
        f"  calibration took {t['total_s']:.0f} s, {100 * t['forward_s'] / t['total_s']:.0f}% "
        f"of it in forward passes; tables: {c.directory}"
    )
    return "\n".join(lines)


def format_jacobian(j: JacobianResult, what: str = "block's own Jacobian") -> str:
    """The connector-free linearity score and the three-way agreement, in a few lines."""
    lines = [
        f"  {what} ({j.tokens:,} held-out tokens): of {j.features_scored:,} "
        f"scored features {100 * j.share_linear:.1f}% linear, {100 * j.share_nonlinear:.1f}% "
        f"nonlinear, {100 * j.share_uncertain:.1f}% uncertain (one slope per connection "
        f"misses ≤ {100 * j.max_nonlinearity:g}% of the first-order account; median "
        f"{100 * j.median_nonlinearity:.0f}%)"
    ]
    a = j.agreement
    if a is not None:
        lines.append(
            f"  three-way agreement on {a.judged} judged strong connections (size within 2× of "
            f"the ablation): Jacobian {100 * a.jacobian_size:.0f}%, connector "
            f"{100 * a.connector_size:.0f}%; ranks (Spearman) {a.jacobian_spearman:.2f} vs "
            f"{a.connector_spearman:.2f}; where the Jacobian misses: first order vs the exact "
            f"map {100 * a.first_order_size:.0f}% agree, the output SAE's threshold "
            f"{100 * a.threshold_size:.0f}%; exact map = model's ablation on "
            f"{100 * a.map_matches_ablation:.0f}%"
        )
    return "\n".join(lines)


def format_logic(c: LogicResult) -> str:
    """Label counts per class and the most confident feature of each."""
    counts = ", ".join(f"{k} {v:,}" for k, v in c.counts.items() if k != "DEAD" or v)
    lines = [f"  logic labels of {c.out_site} features: {counts}"]
    if c.hidden_counts:
        hidden = ", ".join(f"{k} {v:,}" for k, v in c.hidden_counts.items() if v)
        lines.append(f"  sae-connector hidden latents: {hidden}")
    for label, examples in c.most_confident.items():
        if examples:
            lines.append(f"    most confident {label}: {examples[0]}")
    if (g := c.coverage) is not None:
        median = g.inputs_needed.get("median")
        lines.append(
            f"  explained (a label, inputs covering ≥ {g.coverage_target:.0%} of the activation "
            f"mass): {g.explained:,} of {g.alive:,} ({g.share_explained:.1%}); median coverage "
            f"{g.median_coverage:.2f}, held-out AUC {g.median_auc:.2f}; inputs needed for "
            f"{g.coverage_target:.0%}: median {median if median is not None else '–'} "
            f"({g.reached:,} reach it); supernodes {c.supernodes:,}"
        )
    lines.append(f"  tables: {c.directory}")
    return "\n".join(lines)


def format_outliers(c: OutliersResult) -> str:
    """Flagged (artefact) features per site, by reason."""
    lines = []
    for slug, s in c.sites.items():
        share = f" ({100 * s.flagged / s.alive:.1f}%)" if s.alive else ""
        norm = f"high norm {s.high_norm:,}" if s.norm != "unknown" else "norm unknown"
        lines.append(
            f"  outliers {slug}: {s.flagged:,} of {s.alive:,} alive features flagged{share} "
            f"(first tokens {s.first_tokens:,}, first delimiter {s.first_delimiter:,}, "
            f"{norm})"
        )
    lines.append(f"  outlier table: {c.directory}")
    return "\n".join(lines)


def format_ablation(c: AblationResult) -> str:
    """What the context ablation covered and where its table is."""
    return (
        f"  context ablation: {c.contexts:,} top contexts of {c.features:,} features, "
        f"{c.sequences:,} sequences rerun up to the site in {c.seconds:.0f} s "
        f"(clean activations match the store within {c.max_clean_mismatch:.2g}); "
        f"table: {c.directory}"
    )


def format_block(b: BlockResult) -> str:
    """Attention's linear and same-position shares and the residual composition."""
    lines = []
    tau = f"τ = {b.tau:.3g} ({b.form} form)"
    if b.attention is not None and b.attention_share is not None:
        a, share = b.attention, b.attention_share
        lines.append(
            f"  attention {a.in_site} → {a.out_site}: {share.percent_linear:.1f}% of "
            f"{share.alive:,} alive features linear at {tau}; held-out NMSE least squares "
            f"{a.heldout_nmse_linear:.3f}, mlp {a.heldout_nmse_mlp:.3f}"
        )
    if b.positions is not None:
        p, s = b.positions, b.positions.share
        lines.append(
            f"  same position: {s.percent_same_position:.1f}% of attention features "
            f"({_nan(s.percent_same_position_confident):.1f}–"
            f"{_nan(s.percent_same_position_possible):.1f}% "
            f"beyond the noise); held-out NMSE same position {p.heldout_nmse_same:.3f}, "
            f"with earlier positions {p.heldout_nmse_context:.3f}"
        )
    if b.attention_jacobian is not None:
        lines.append(format_jacobian(b.attention_jacobian, "attention's own Jacobian"))
    if b.composition is not None:
        c = b.composition
        shares = ", ".join(f"{site} {v:.2f}" for site, v in c.variance_share_ls.items())
        lines.append(
            f"  composition {c.target}: held-out R² sparse {c.r2_sparse:.3f} "
            f"({c.weights_per_output:.1f} weights per feature), least squares "
            f"{c.r2_ls:.3f}; variance share {shares}"
        )
        if b.decoded_fvu:
            lines.append(
                "  decoded FVU of the next stream: "
                + ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in b.decoded_fvu.items())
            )
    return "\n".join(lines)


def format_model_summary(summary: ModelSummary) -> str:
    """One line per layer of a model run, then where everything is."""
    import polars as pl

    lines = [f"coact analyze: {summary.model}, layers {summary.layers}"]
    try:
        table = pl.read_parquet(RunLayout.of(summary.run_dir).layers_table)
    except OSError:
        table = None
    if table is not None:
        lines += _layer_lines(table)
    lines.append(f"  total time {summary.timings['total_s']:.0f} s")
    model = RunLayout.of(summary.run_dir)
    inside = f"{model.layers_table.name}, {model.layer_dir('<layer>').name}/"
    lines.append(f"  run directory: {summary.run_dir}  ({inside} inside)")
    if summary.report:
        lines.append(f"  report: {summary.report}  (open it in a browser)")
    return "\n".join(lines)


def _layer_lines(table: Any) -> list[str]:
    def pct(v: Any) -> str:
        return "   –  " if v is None else f"{v:5.1f}%"

    lines = ["  layer   MLP linear   attn linear   attn same-pos   composition R²"]
    for row in table.iter_rows(named=True):
        r2 = row.get("composition_r2_sparse")
        lines.append(
            f"  {row['layer']:>5}   {pct(row.get('mlp_percent_linear')):>10}   "
            f"{pct(row.get('attention_percent_linear')):>11}   "
            f"{pct(row.get('attention_percent_same_position')):>13}   "
            + ("–" if r2 is None else f"{r2:.3f}")
        )
    return lines


def format_graph(graph: FeatureGraph) -> str:
    """A feature's layer graph as one line per connection, hop by hop, strongest first:
    `source → target  weight  (path)`."""
    labels = {
        (row["site"], row["feature"]): f" ({row['label']})" if row["label"] else ""
        for row in graph.nodes.iter_rows(named=True)
    }

    def node(site: str, feature: int) -> str:
        return f"{site}#{feature}{labels.get((site, feature), '')}"

    lines = [
        f"layer graph of {node(graph.site, graph.feature)}: {graph.depth} hops {graph.direction}, "
        f"the {graph.top} strongest connections per feature, weights {graph.weight}"
    ]
    for hop, edges in graph.edges.group_by("depth", maintain_order=True):
        lines.append(f"  hop {hop[0]}:")
        for e in edges.iter_rows(named=True):
            standardised = e["standardised"]
            strength = "" if standardised is None else f", standardised {standardised:+.3f}"
            lines.append(
                f"    {node(e['source_site'], e['source_feature'])} → "
                f"{node(e['target_site'], e['target_feature'])}  "
                f"w {e['weight']:+.4g}{strength}  ({e['path']})"
            )
    if graph.edges.is_empty():
        lines.append("  no connections reach it in the block's weight tables")
    return "\n".join(lines)
