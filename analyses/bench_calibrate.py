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
from coact.models.sites import Site
from coact.pipeline.run import AnalyzeConfig, calibration_tokens, run_contexts
from coact.sae.formats import load_sae

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "smollm2-135m-L3")
    parser.add_argument("--out", type=Path, default=ROOT / "analyses/results/bench_calibrate.json")
    args = parser.parse_args()
    config = AnalyzeConfig.from_dict(json.loads((args.run / "config.json").read_text()))
    lm = load_model(config.model, device=config.device, seed=config.seed)
    saes = {
        kind: load_sae(args.run / "sae" / Site(kind, config.layer).slug, device=config.device)
        for kind in ("mlp_resid", "mlp_out")
    }
    _, code_part = run_contexts(config, lm)
    store = CodeStore.open(args.run / "codes")
    connect_settings = dataclasses.replace(config.connect_settings, seed=config.seed)
    tokens = calibration_tokens(code_part, store, connect_settings)
    settings = dataclasses.replace(config.calibrate_settings, layer=config.layer, seed=config.seed)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        summary = calibrate(
            lm,
            saes["mlp_resid"],
            saes["mlp_out"],
            tokens,
            args.run / "connect",
            Path(tmp),
            settings,
        )
    wall = time.perf_counter() - started
    timings = summary["timings"]
    result = {
        "benchmark": "bench_calibrate",
        "run": str(args.run),
        "model": lm.name,
        "layer": config.layer,
        "contexts": summary["n_contexts"],
        "tokens": summary["n_tokens"],
        "settings": dataclasses.asdict(settings),
        "seconds_total": timings["total_s"],
        "seconds_forward": timings["forward_s"],
        "forward_share": timings["forward_s"] / timings["total_s"],
        "seconds_by_part": {k: v for k, v in timings.items() if k not in ("total_s", "forward_s")},
        "seconds_wall_with_loading": wall,
        "tau": summary["tau"],
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
