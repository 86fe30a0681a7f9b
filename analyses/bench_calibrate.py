"""Time of a full calibration on a finished run, and the share spent in forward passes.

Runs `coact.calibrate.stage.calibrate` with the run's own settings into a temporary directory
(the run's `calibrate/` is left alone), so every stage is measured, nothing reused:
noise curves, splices, the causal check. The forward share is the time inside the model's
forward calls (hooks on the root module) over the whole calibration; the rest is SAE
encoding and decoding, connector predictions and bootstraps. Target: forward passes
dominate. Writes analyses/results/bench_calibrate.json.

    python analyses/bench_calibrate.py --run runs/smollm2-135m-L3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from coact.calibrate.stage import calibrate
from coact.codes.store import CodeStore
from coact.models.load import load_model
from coact.models.sites import SitePair
from coact.pipeline.config import AnalyzeConfig
from coact.pipeline.shared import calibration_tokens, run_contexts
from coact.rundir.layout import RunLayout
from coact.sae.formats import load_sae

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "smollm2-135m-L3")
    parser.add_argument("--out", type=Path, default=ROOT / "analyses/results/bench_calibrate.json")
    args = parser.parse_args()
    layout = RunLayout.of(args.run)
    config = AnalyzeConfig.from_dict(json.loads(layout.config.read_text())).resolved()
    lm = load_model(config.model, device=config.device, seed=config.seed)
    pair = SitePair.mlp(config.layer)
    sae_in, sae_out = (  # the SAEs the run was given, else those it trained
        load_sae(given or layout.sae_dir(site.slug), device=config.device)
        for given, site in ((config.sae_in, pair.in_site), (config.sae_out, pair.out_site))
    )
    _, code_part = run_contexts(config, lm)
    store = CodeStore.open(layout.codes)
    tokens = calibration_tokens(code_part, store, config.connect)
    settings = config.calibrate
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        summary = calibrate(
            lm, pair, sae_in, sae_out, tokens, layout.connect.path, Path(tmp), settings
        )
    wall = time.perf_counter() - started
    timings = summary.timings
    result = {
        "benchmark": "bench_calibrate",
        "run": str(args.run),
        "model": lm.name,
        "layer": config.layer,
        "contexts": summary.n_contexts,
        "tokens": summary.n_tokens,
        "settings": dataclasses.asdict(settings),
        "seconds_total": timings["total_s"],
        "seconds_forward": timings["forward_s"],
        "forward_share": timings["forward_s"] / timings["total_s"],
        "seconds_by_part": {k: v for k, v in timings.items() if k not in ("total_s", "forward_s")},
        "seconds_wall_with_loading": wall,
        "tau": summary.tau,
        "machine": {
            "cpu_count": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "settings"}, indent=2))


if __name__ == "__main__":
    main()
