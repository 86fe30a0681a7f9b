"""Charts of SAE training: FVU, AuxK loss and dead latents per step."""

from __future__ import annotations

from collections.abc import Mapping

import altair as alt
import polars as pl

from coact.report.charts.base import chart_title, to_pandas
from coact.sae.train import TrainLog


def sae_training(logs: Mapping[str, TrainLog]) -> alt.HConcatChart:
    """Each trained SAE's FVU and dead fraction against training tokens."""
    frames = []
    for site, log in logs.items():
        fvu = list(log.fvu)
        if not fvu:
            continue
        seen = float(log.tokens_seen)
        step_tokens = seen / len(fvu)
        dead = list(log.dead_fraction) or [float("nan")] * len(fvu)
        frames.append(
            pl.DataFrame(
                {
                    "site": [site] * len(fvu),
                    "tokens": [step_tokens * (i + 1) for i in range(len(fvu))],
                    "fvu": [float(v) for v in fvu],
                    "dead": [100.0 * float(v) for v in dead[: len(fvu)]],
                }
            )
        )
    frame = to_pandas(pl.concat(frames)) if frames else to_pandas(pl.DataFrame({"site": []}))
    x = alt.X("tokens:Q", title="training tokens seen")
    colour = alt.Color("site:N", title="site")
    fvu = (
        alt.Chart(frame)
        .mark_line()
        .encode(
            x=x,
            y=alt.Y(
                "fvu:Q",
                title="FVU (fraction of variance unexplained, log)",
                scale=alt.Scale(type="log"),
            ),
            color=colour,
        )
        .properties(width=300, height=200)
    )
    dead = (
        alt.Chart(frame)
        .mark_line()
        .encode(x=x, y=alt.Y("dead:Q", title="dead latents (% of width)"), color=colour)
        .properties(width=220, height=200)
    )
    total = max((float(log.tokens_seen) for log in logs.values()), default=0.0)
    return alt.hconcat(fvu, dead).properties(
        title=chart_title(
            "SAE training: reconstruction error and dead latents",
            f"per training batch; up to {total:,.0f} training tokens per SAE",
        )
    )
