"""coact's TopK trainer beside sparsify's own trainer (EleutherAI sparsify 1.3.3), on the
same activations, width, k and token budget: tokens per second and held-out FVU.

Both read the same corpus contexts of the embedded SmolLM2 (the first `--tokens` tokens of
the corpus coact's analyze trains its SAEs on) and train on the MLP of block `--layer`:
  sae         — an SAE on the MLP's output (coact: `train_saes` at mlp_out[ℓ]; sparsify:
                hookpoint layers.ℓ.mlp, autoencoding its output);
  transcoder  — a skip transcoder from the MLP's input to its output (coact:
                `train_transcoders`; sparsify: transcode=True, skip_connection=True).
Each trainer runs the model itself (capture included in its seconds) with its own defaults
for everything the comparison does not fix (coact: Adam, 1024-token batches shuffled in a
buffer, AuxK; sparsify: its `Trainer` with signum + schedule-free, 32-context batches, no
AuxK by default). The BOS position is left out of both (sparsify's `exclude_tokens`).
Held-out FVU (about the mean) on contexts after the training ones. Writes
analyses/results/bench_transcoder.json.

    python analyses/bench_transcoder.py [--tokens 400000] [--layer 3] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from coact.codes.corpus import CorpusConfig, build_contexts
from coact.models.load import LoadedModel, load_model
from coact.models.sites import Site
from coact.models.tracing import capture
from coact.sae.train import SaeTrainConfig, train_saes
from coact.transcoder.train import train_transcoders

ROOT = Path(__file__).resolve().parents[1]


def _fvu(y: torch.Tensor, pred: torch.Tensor) -> float:
    return float((y - pred).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


def _held_out(lm: LoadedModel, tokens: torch.Tensor, layer: int) -> tuple[torch.Tensor, ...]:
    sites = [Site("mlp_in", layer), Site("mlp_out", layer)]
    parts = [capture(lm, tokens[i : i + 8], sites) for i in range(0, tokens.shape[0], 8)]
    return tuple(torch.cat([p[s][:, 1:].reshape(-1, p[s].shape[-1]) for p in parts]) for s in sites)


def _coact(lm: LoadedModel, train: torch.Tensor, layer: int, kind: str, config: SaeTrainConfig,
           held: tuple[torch.Tensor, ...]) -> dict[str, Any]:  # fmt: skip
    x, y = held
    started = time.perf_counter()
    if kind == "sae":
        sae, log = train_saes(lm, train, [Site("mlp_out", layer)], config)[Site("mlp_out", layer)]
        seconds = time.perf_counter() - started
        with torch.no_grad():
            fvu = _fvu(y, sae(y))
    else:
        tc, log = train_transcoders(lm, train, [layer], config)[layer]
        seconds = time.perf_counter() - started
        with torch.no_grad():
            fvu = _fvu(y, tc(x))
    rate = log.tokens_seen / seconds
    return {"seconds": seconds, "tokens": log.tokens_seen, "tokens_per_s": rate,
            "heldout_fvu": fvu, "final_train_fvu": log.fvu[-1]}  # fmt: skip


def _sparsify(lm: LoadedModel, train: torch.Tensor, layer: int, kind: str, width: int, k: int,
              held: tuple[torch.Tensor, ...], batch: int) -> dict[str, Any]:  # fmt: skip
    from datasets import Dataset
    from sparsify import SparseCoderConfig, TrainConfig, Trainer

    bos = int(train[0, 0])
    transcode = kind == "transcoder"
    coder = SparseCoderConfig(
        num_latents=width, k=k, transcode=transcode, skip_connection=transcode
    )
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(
            coder, batch_size=batch, hookpoints=[f"layers.{layer}.mlp"], log_to_wandb=False,
            save_dir=out, save_every=10**9, exclude_tokens=[bos],
        )  # fmt: skip
        data = Dataset.from_dict({"input_ids": train.tolist()}).with_format("torch")
        trainer = Trainer(cfg, data, lm.model)
        started = time.perf_counter()
        trainer.fit()
        seconds = time.perf_counter() - started
    coder_model = trainer.saes[f"layers.{layer}.mlp"]
    x, y = held
    with torch.no_grad():
        fvu = float(coder_model(x if transcode else y, y).fvu)
    n = int((train[:, 1:] != bos).sum())
    return {"seconds": seconds, "tokens": n, "tokens_per_s": n / seconds, "heldout_fvu": fvu,
            "optimizer": cfg.optimizer, "batch_contexts": batch}  # fmt: skip


def measure(model: str, layer: int, tokens: int, held_contexts: int, batch: int) -> dict[str, Any]:
    lm = load_model(model)
    config = SaeTrainConfig()
    per_context = 127
    n_train = -(-tokens // per_context)
    contexts = build_contexts(
        CorpusConfig(n_tokens=(n_train + held_contexts) * per_context), lm.tokenizer
    ).tokens
    train, held_tokens = contexts[:n_train], contexts[n_train : n_train + held_contexts]
    assert int((train[:, 1:] == train[0, 0]).sum()) == 0, "BOS inside contexts: exclude differs"
    held = _held_out(lm, held_tokens, layer)
    width = config.expansion * lm.adapter.d_model
    rows: dict[str, Any] = {}
    for kind in ("sae", "transcoder"):
        rows[kind] = {
            "coact": _coact(lm, train, layer, kind, config, held),
            "sparsify": _sparsify(lm, train, layer, kind, width, config.k, held, batch),
        }
        print(kind, json.dumps(rows[kind], indent=1))
    return {
        "model": model, "layer": layer, "width": width, "k": config.k,
        "train_tokens": int(train.shape[0] * (train.shape[1] - 1)),
        "heldout_tokens": int(held[1].shape[0]), "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(), "results": rows,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=400_000)
    parser.add_argument("--held-contexts", type=int, default=32)
    parser.add_argument("--batch-contexts", type=int, default=32, help="sparsify's batch_size")
    parser.add_argument("--out", default=str(ROOT / "analyses/results/bench_transcoder.json"))
    args = parser.parse_args()
    result = measure(args.model, args.layer, args.tokens, args.held_contexts, args.batch_contexts)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
