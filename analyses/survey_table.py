"""Every layer of a model run (`coact analyze --layers all`) as one markdown table, and the
headline figures as JSON: what docs/pipeline.md quotes for the embedded default.

    python analyses/survey_table.py runs/smollm2-135m-L0-29

reads the run's layer table (`layers.parquet`), its summary and each layer's (the file
names come from `coact.rundir.layout.RunLayout`), prints the table (shares at
each site's calibrated τ and at the seed's 0.001, the fits' held-out NMSE, the causal
position checks, the composition) and writes analyses/results/survey_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import polars as pl

from coact.errors import CoactError
from coact.pipeline.summary import ModelSummary, RunSummary
from coact.rundir.layout import RunLayout

ROOT = Path(__file__).resolve().parents[1]

COLUMNS = [  # (layers.parquet column, header, format)
    ("mlp_percent_linear", "MLP linear (τ)", "pct"),
    ("mlp_percent_linear_seed_tau", "MLP linear (0.001)", "pct"),
    ("mlp_percent_mlp_gain", "mlp beats LS", "pct"),
    ("attention_percent_linear", "attn linear (τ)", "pct"),
    ("attention_percent_same_position", "attn same position (τ)", "pct"),
    ("attention_percent_same_position_seed_tau", "attn same position (0.001)", "pct"),
    ("attention_nmse_same_position", "attn NMSE same / with context", "pair"),
    ("attention_percent_context_free", "attn context-free (resampled)", "pct"),
    ("composition_r2_sparse", "composition R² sparse / LS", "pair"),
    ("composition_share_resid_pre", "share skip / attn / MLP", "triple"),
    ("decoded_fvu_composition_decoded", "decoded FVU composition / target SAE", "pair"),
]
PARTNERS = {
    "attention_nmse_same_position": ["attention_nmse_with_context"],
    "composition_r2_sparse": ["composition_r2_ls"],
    "composition_share_resid_pre": ["composition_share_attn_out", "composition_share_mlp_out"],
    "decoded_fvu_composition_decoded": ["decoded_fvu_target_sae"],
}


def _fmt(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.1f} %" if kind == "pct" else f"{value:.2f}"


def markdown(table: pl.DataFrame) -> str:
    header = ["layer", *(h for _, h, _ in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.sort("layer").iter_rows(named=True):
        cells = [str(row["layer"])]
        for column, _, kind in COLUMNS:
            if column not in row:
                cells.append("–")
                continue
            parts = [column, *PARTNERS.get(column, [])]
            cells.append(" / ".join(_fmt(row.get(c), kind) for c in parts))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def headline(run: Path, table: pl.DataFrame) -> dict[str, Any]:
    def span(column: str) -> list[float] | None:
        if column not in table.columns:
            return None
        values = table[column].drop_nulls().to_numpy()
        return [float(values.min()), float(values.max())] if len(values) else None

    layout = RunLayout.of(run)
    summary = ModelSummary.read(layout.summary)
    layer_seconds = {}
    for layer in table["layer"].to_list():
        layer_summary = RunSummary.read(RunLayout.of(layout.layer_dir(layer)).summary)
        if layer_summary is not None:
            layer_seconds[str(layer)] = layer_summary.timings.get("total_s")
    return {
        "run": str(run),
        "model": summary.model if summary else None,
        "layers": table["layer"].to_list(),
        "tokens": summary.tokens if summary else None,
        "shared_timings_s": summary.timings if summary else None,
        "layer_seconds": layer_seconds,
        "ranges": {c: span(c) for c in table.columns if c not in ("layer", "form")},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a model run directory")
    parser.add_argument("--out", type=Path, default=None, help="JSON (default: analyses/results/)")
    args = parser.parse_args(argv)
    path = RunLayout.of(args.run).layers_table
    if not path.is_file():
        print(f"survey_table: no {path.name} in {args.run}", file=sys.stderr)
        return 2
    table = pl.read_parquet(path)
    try:
        result = headline(args.run, table)
    except CoactError as error:
        print(f"survey_table: {error}", file=sys.stderr)
        return 2
    name = str(result.get("model") or args.run.name).replace("/", "_")
    out = args.out or ROOT / "analyses" / "results" / f"survey_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(table))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
