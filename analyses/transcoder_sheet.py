"""Write one run's transcoder sheet (and what it rests on) as analyses/results JSON.

    python analyses/transcoder_sheet.py runs/transcoder-L3-400k \
        analyses/results/transcoder_sheet_L3.json --what "..."

Reads the run's summary.json and config.json: the model, layer, corpus and budgets, each
SAE's evaluation, the connectors' held-out NMSE, the Jacobian's linear share, the stage
seconds and the transcoder's sheet with both routes' label counts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

CONFIG_FIELDS = ("model", "layer", "corpus", "tokens", "sae_tokens", "code_offset_tokens",
                 "ctx_len", "seed", "stages")  # fmt: skip
SITE_FIELDS = ("fve", "l0", "dead_fraction", "ce_recovered")
CONNECT_FIELDS = ("heldout_nmse_linear", "heldout_nmse_mlp", "heldout_nmse_sparse")


def sheet(run_dir: Path, what: str) -> dict[str, Any]:
    """The results JSON of `run_dir`: its config, sites, connectors, Jacobian and sheet."""
    summary = json.loads((run_dir / "summary.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    if summary.get("transcoder") is None:
        raise SystemExit(f"{run_dir} has no transcoder sheet: run analyze with --transcoder")
    connect, logic = summary["connect"], summary.get("logic")
    return {
        "what": what,
        "config": {k: config[k] for k in CONFIG_FIELDS},
        "budget": {
            "sae_tokens": config["sae_tokens"],
            "transcoder_tokens": summary["transcoder"]["train_tokens"],
            "code_tokens": summary["tokens"],
        },
        "sites": {site: {k: row[k] for k in SITE_FIELDS} for site, row in summary["sites"].items()},
        "connect": {
            **{k: connect[k] for k in CONNECT_FIELDS},
            "weights_per_output": connect["weights_per_output"],
        },
        "jacobian_share_linear": summary["jacobian"]["share_linear"],
        "logic_coverage": logic.get("coverage") if logic else None,
        "timings": summary["timings"],
        "transcoder": summary["transcoder"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--what", required=True, help="one line: what run this sheet is from")
    args = parser.parse_args()
    args.out.write_text(json.dumps(sheet(args.run_dir, args.what), indent=2) + "\n")


if __name__ == "__main__":
    main()
