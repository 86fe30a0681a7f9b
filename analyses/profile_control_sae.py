"""Why the control's SAEs seemed to train slower than the real model's: one buffer of
embedded-corpus contexts captured at block LAYER of SmolLM2-135M and of its re-initialised
copy (the control, `coact.models.load.reinitialised`, seed 0, made after the real model
has been traced, as in a run), then `SaeTrainer.step` on both, interleaved step by step so
that a loaded machine slows both alike, timed in wall and CPU seconds. The trainers start
from the recipe's initialisation, or (`--from-run RUN`) from the SAEs a finished
`analyze --control` run trained (its own and its control's), to see the end of training.
Also records what could make one slower: the activations' scale and mean, and denormals
in the data, the SAE's weights and the optimizer's state after the steps.

    python analyses/profile_control_sae.py [--contexts 32] [--steps 8] [--threads 1]
        [--from-run RUN]

Writes analyses/results/profile_control_sae.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from coact.codes.corpus import CorpusConfig, build_contexts
from coact.models.load import LoadedModel, load_model, reinitialised
from coact.models.sites import Site
from coact.models.tracing import capture
from coact.rundir.layout import RunLayout
from coact.sae.formats import load_sae
from coact.sae.train import SaeTrainConfig, SaeTrainer

ROOT = Path(__file__).resolve().parents[1]
TINY = torch.finfo(torch.float32).tiny


def _denormal_share(t: torch.Tensor) -> float:
    t = t.detach().float()
    return float(((t != 0) & (t.abs() < TINY)).float().mean())


def _acts(lm: LoadedModel, tokens: torch.Tensor, sites: list[Site]) -> dict[Site, torch.Tensor]:
    parts: dict[Site, list[torch.Tensor]] = {s: [] for s in sites}
    for j in range(0, tokens.shape[0], 16):
        acts = capture(lm, tokens[j : j + 16], sites)
        for s in sites:
            parts[s].append(acts[s][:, 1:].reshape(-1, acts[s].shape[-1]))
    return {s: torch.cat(v) for s, v in parts.items()}


def _trainer(data: torch.Tensor, run: Path | None, site: Site) -> SaeTrainer:
    """The recipe's trainer on `data`; from `run`, with that run's trained SAE put back in
    the trainer's scaled units (the inverse of `SaeTrainer.finish`)."""
    trainer = SaeTrainer(data, SaeTrainConfig(), torch.Generator().manual_seed(0))
    if run is not None:
        trained = load_sae(RunLayout.of(run).sae_dir(site.slug))
        s = float(trained.metadata["input_scale"])
        trainer.scale = s
        with torch.no_grad():
            trainer.sae.W_enc.copy_(trained.W_enc * s)
            trainer.sae.b_enc.copy_(trained.b_enc)
            trainer.sae.W_dec.copy_(trained.W_dec / s)
            trainer.sae.b_dec.copy_(trained.b_dec / s)
    return trainer


def _state(trainer: SaeTrainer, data: torch.Tensor) -> dict[str, float]:
    optimizer_state = [s for p in trainer.optimizer.state.values() for s in p.values() if s.ndim]
    return {
        "scale": trainer.scale,
        "mean_norm_over_scale": float(trainer.mean.norm()) / trainer.scale,
        "denormal_data": _denormal_share(data / trainer.scale),
        "denormal_weights": max(_denormal_share(p) for p in trainer.sae.parameters()),
        "denormal_adam_state": max(_denormal_share(s) for s in optimizer_state),
        "fvu_last": trainer.log.fvu[-1],
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    real = load_model("smollm2-135m")
    contexts = build_contexts(CorpusConfig(n_tokens=args.contexts * 127), real.tokenizer)
    tokens = contexts.tokens[: args.contexts]
    sites = [Site("mlp_resid", args.layer), Site("mlp_out", args.layer)]
    acts = {"real": _acts(real, tokens, sites)}  # the real model is traced first, as in a run
    control = reinitialised(real, 0)
    acts["control"] = _acts(control, tokens, sites)
    runs = {"real": args.from_run, "control": args.from_run / "control" if args.from_run else None}
    trainers = {(n, s): _trainer(acts[n][s], runs[n], s) for n in acts for s in sites}
    wall = dict.fromkeys(trainers, 0.0)
    cpu = dict.fromkeys(trainers, 0.0)
    batch = SaeTrainConfig().batch_tokens
    n_batches = acts["real"][sites[0]].shape[0] // batch
    for step in range(args.steps + 1):  # step 0 warms up
        b = step % n_batches
        for key, trainer in trainers.items():  # interleaved: load slows all alike
            data = acts[key[0]][key[1]][b * batch : (b + 1) * batch]
            w, c = time.perf_counter(), time.process_time()
            trainer.step(data)
            if step:
                wall[key] += time.perf_counter() - w
                cpu[key] += time.process_time() - c
    tokens_timed = args.steps * batch
    out: dict[str, Any] = {
        "threads": args.threads,
        "steps": args.steps,
        "from_run": str(args.from_run),
    }
    for (name, site), trainer in trainers.items():
        out[f"{name} {site}"] = {
            "tokens_per_wall_s": tokens_timed / wall[(name, site)],
            "tokens_per_cpu_s": tokens_timed / cpu[(name, site)],
            **_state(trainer, acts[name][site]),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--from-run", type=Path, default=None)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "analyses/results/profile_control_sae.json"
    )
    args = parser.parse_args()
    result = measure(args)
    print(json.dumps(result, indent=1))
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    previous[f"threads={args.threads} from_run={args.from_run is not None}"] = result
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(previous, indent=2) + "\n")


if __name__ == "__main__":
    main()
