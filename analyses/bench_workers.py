"""`coact analyze --layers …` with `--workers 2` against one process, on this machine.

A four-layer tiny Llama (saved to a local folder, so nothing is fetched) at the survey
budget with a few thousand tokens: first the whole run serially (torch's default threads),
then the same run's layers on two Ray workers (one thread each) from a copy of the serial
run's SAEs and codes, which the two runs share. Writes analyses/results/bench_workers.json:
both times, the layer phase's ratio (what `--workers` parallelises), the whole run's ratio
(the shared SAEs and codes are made once, serially, either way), and the machine's load
(`uptime`) before and after, since other processes share the cores.

`--phase saes` times the SAE training instead (`prepare`: the SAE groups, `--sae-group`
per pass, then their evaluation and the codes in this process), serially and with the
groups on the workers (Ray's start and each worker's loading included), into
bench_workers_saes.json.

    python analyses/bench_workers.py [--layers 4] [--tokens 4000] [--workers 2]
    python analyses/bench_workers.py --phase saes [--sae-tokens 40000] [--sae-group 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from coact.models.load import load_model, tiny_model, tiny_tokenizer
from coact.pipeline.budgets import with_budget
from coact.pipeline.config import BLOCK_STAGES, AnalyzeConfig
from coact.pipeline.executor import Execution, limit_threads, one_cluster
from coact.pipeline.run import analyze
from coact.pipeline.shared import groups_on_ray, layer_sites, prepare
from coact.rundir.layout import RunLayout

RESULTS = Path(__file__).resolve().parent / "results" / "bench_workers.json"
SHARED = ("config.json", "sae", "sae_eval", "codes")


def model_dir(root: Path, layers: int, d_model: int) -> Path:
    """A tiny Llama of `layers` blocks, saved where `--model` can name it."""
    folder = root / f"tiny-llama-{layers}x{d_model}"
    if not (folder / "config.json").is_file():
        tiny_model("tiny-llama", n_layers=layers, d_model=d_model).save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
    return folder


def config(model: Path, run: Path, args: argparse.Namespace) -> AnalyzeConfig:
    base = AnalyzeConfig(model=str(model), layers=tuple(range(args.layers)), run_dir=str(run))
    base = with_budget(base, "survey")
    return dataclasses.replace(
        base,
        tokens=args.tokens,
        sae_tokens=args.sae_tokens,
        ctx_len=64,
        report_features=2,
        sae=dataclasses.replace(base.sae, batch_tokens=256, buffer_contexts=32),
    )


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def shared_phase(model: Path, run: Path, args: argparse.Namespace, workers: int) -> dict[str, Any]:
    """The timings of one `prepare` (the model run's SAEs, evaluations and codes), its SAE
    groups here (`workers` 1) or on a Ray cluster started for it."""
    cfg = dataclasses.replace(config(model, run, args), sae_group=args.sae_group)
    cfg = cfg.with_stages(add=BLOCK_STAGES).resolved()
    lm = load_model(cfg.model, device=cfg.device, seed=cfg.seed)
    layers = cfg.layers if isinstance(cfg.layers, tuple) else ()
    sites = list(dict.fromkeys(s for layer in layers for s in layer_sites(cfg, layer)))
    train = groups_on_ray(Execution(workers=workers)) if workers > 1 else None
    started = time.perf_counter()
    with one_cluster():
        shared = prepare(cfg, lm, sites, dict.fromkeys(sites), RunLayout(run, run), train)
    return {**shared.timings, "wall_s": time.perf_counter() - started, "sites": len(sites)}


def saes(model: Path, args: argparse.Namespace, record: dict[str, Any]) -> None:
    """Serially, then on `args.workers` workers, each into a fresh run directory."""
    serial = shared_phase(model, args.root / "serial", args, 1)
    workers = shared_phase(model, args.root / "workers", args, args.workers)
    record.update(
        uptime_after=uptime(),
        serial=serial,
        workers=workers,
        ratio_train=serial["train_saes_s"] / workers["train_saes_s"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--sae-tokens", type=int, default=6000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--phase", choices=("layers", "saes"), default="layers")
    parser.add_argument("--sae-group", type=int, default=4)
    parser.add_argument("--threads", type=int, help="this process's threads (default: torch's)")
    parser.add_argument("--root", type=Path, default=Path("runs") / "bench-workers")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        limit_threads(args.threads)
    shutil.rmtree(args.root / "serial", ignore_errors=True)
    shutil.rmtree(args.root / "workers", ignore_errors=True)
    model = model_dir(args.root, args.layers, args.d_model)
    record: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "args": {**vars(args), "root": None, "out": None},
    }
    record["uptime_before"] = uptime()
    if args.phase == "saes":
        saes(model, args, record)
        out = args.out if args.out != RESULTS else RESULTS.with_name("bench_workers_saes.json")
        out.write_text(json.dumps(record, indent=2) + "\n")
        print(json.dumps(record, indent=2))
        return

    started = time.perf_counter()
    serial = analyze(config(model, args.root / "serial", args))
    serial_s = time.perf_counter() - started
    shared_s = sum(v for k, v in serial.timings.items() if k != "total_s")

    parallel_dir = args.root / "workers"
    parallel_dir.mkdir(parents=True)
    for name in SHARED:
        source = args.root / "serial" / name
        copy = shutil.copytree if source.is_dir() else shutil.copy2
        copy(source, parallel_dir / name)
    started = time.perf_counter()
    analyze(config(model, parallel_dir, args), Execution(workers=args.workers))
    workers_s = time.perf_counter() - started

    record.update(
        uptime_after=uptime(),
        serial_s=serial_s,
        shared_s=shared_s,
        serial_layers_s=serial_s - shared_s,
        workers_layers_s=workers_s,
        ratio_layers=(serial_s - shared_s) / workers_s,
        ratio_run=serial_s / (shared_s + workers_s),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
