"""coact's end-to-end TopK training beside sparsify's own `Trainer` (EleutherAI sparsify
1.3.3), both from the model: tokens per wall second and per CPU second, and held-out FVU.

Both train on the same corpus contexts (coact's `build_contexts`, the first `--tokens`
tokens; the BOS position left out of training by both), at width expansion × d_model, k and
a 1,024-token step:
  sae         — an SAE on the output of block `--layer`'s MLP: coact's `train_saes` on
                `mlp_out` against sparsify's `Trainer` on hookpoint `layers.<l>.mlp`;
  transcoder  — a skip transcoder from that MLP's input to its output: coact's
                `train_transcoders` against sparsify's `Trainer` with transcode and
                skip_connection.
sparsify's `Trainer` is called as its CLI (`python -m sparsify`) calls it: the base model
(`AutoModel`'s class for the FVU loss: the `LlamaModel` inside coact's model, no LM head), a
`datasets.Dataset` of `input_ids` shuffled with the CLI's seed, `TrainConfig` defaults
(signum under schedule-free, AuxK off) except batch_size 8 contexts (1,016 tokens, next to
coact's 1,024), `exclude_tokens` [BOS], no wandb, and save_dir a temporary folder. It runs
the whole model per batch; coact's capture stops after the last block it needs.

Each trainer runs in its own process (so sparsify's global matmul setting stays its own);
the timed window is the trainer's call to its saved checkpoint, forward passes included,
model loading and tokenizing not. Wall seconds, process CPU seconds (`time.process_time`,
all threads) and the load average just before and after are recorded. Held-out FVU: each
checkpoint loaded back through coact's loaders (`load_sae`, `load_transcoder`) and run on
the MLP's input and output over `--held-contexts` contexts after the training ones; for
sparsify's checkpoints also the largest difference from `SparseCoder.load_from_disk`'s
output on the same rows. The JSON is rewritten after every trainer (results already in it
for the same token budget are kept, so a stopped run is resumed where it stopped).

`--forward-cost N` times, instead, the forward passes alone on the first N contexts (process
CPU seconds per 1,000 tokens: the whole base model 8 contexts a pass, coact's capture of the
MLP 16 a pass) and adds them to the JSON of the same token budget.

    python analyses/bench_sparsify_trainer.py [--tokens 400000] [--kinds sae transcoder]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from coact.codes.corpus import CorpusConfig, build_contexts
from coact.models.load import LoadedModel, load_model
from coact.models.sites import Site
from coact.models.tracing import capture
from coact.sae.formats.load import load_sae
from coact.sae.formats.saelens import save_saelens
from coact.sae.train import SaeTrainConfig, train_saes
from coact.transcoder.formats import hookpoint, load_transcoder, save_transcoder
from coact.transcoder.train import train_transcoders

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("sae", "transcoder")
TRAINERS = ("coact", "sparsify")
SPARSIFY_BATCH = 8  # contexts per step: 8 × 127 = 1,016 tokens, beside coact's 1,024
SHUFFLE_SEED = 42  # the sparsify CLI's default `--shuffle_seed`
Rows = tuple[torch.Tensor, torch.Tensor]  # (mlp_in, mlp_out), tokens × d_model


def corpus_split(lm: LoadedModel, tokens: int, held_contexts: int) -> tuple[torch.Tensor, ...]:
    """(training contexts holding `tokens` tokens after BOS, the held-out ones after them)."""
    n_train = -(-tokens // 127)
    corpus = CorpusConfig(n_tokens=(n_train + held_contexts) * 127)
    contexts = build_contexts(corpus, lm.tokenizer).tokens
    return contexts[:n_train], contexts[n_train : n_train + held_contexts]


def mlp_rows(lm: LoadedModel, tokens: torch.Tensor, layer: int) -> Rows:
    """The MLP's input and output at every position but the first (BOS)."""
    sites = [Site("mlp_in", layer), Site("mlp_out", layer)]
    parts = [capture(lm, tokens[i : i + 16], sites) for i in range(0, tokens.shape[0], 16)]
    x, y = (torch.cat([p[s][:, 1:].reshape(-1, p[s].shape[-1]) for p in parts]) for s in sites)
    return x.float(), y.float()


def fvu(y: torch.Tensor, pred: torch.Tensor) -> float:
    """Fraction of the variance of y about its mean left unexplained by pred."""
    return float((y - pred).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


def train_sparsify(
    lm: LoadedModel, tokens: torch.Tensor, kind: str, layer: int, config: SaeTrainConfig,
    save_dir: Path, batch_size: int = SPARSIFY_BATCH,
) -> Path:  # fmt: skip
    """sparsify's `Trainer` on the contexts `tokens`, as its CLI runs it; its checkpoint."""
    from datasets import Dataset
    from sparsify import SaeConfig, TrainConfig, Trainer

    bos = int(tokens[0, 0])
    if int((tokens == bos).sum()) != tokens.shape[0]:
        raise ValueError("BOS appears past the first position: exclude_tokens would drop more")
    dataset = Dataset.from_dict({"input_ids": tokens.tolist()}).shuffle(SHUFFLE_SEED)
    transcode = kind == "transcoder"
    width = config.expansion * lm.adapter.d_model
    cfg = TrainConfig(
        SaeConfig(num_latents=width, k=config.k, transcode=transcode, skip_connection=transcode),
        batch_size=batch_size,
        hookpoints=[hookpoint(layer)],
        exclude_tokens=[bos],
        log_to_wandb=False,
        save_dir=str(save_dir),
        run_name=kind,
    )
    Trainer(cfg, dataset.with_format("torch"), lm.model.base_model).fit()
    torch.set_float32_matmul_precision("highest")  # fit() sets "high" for the process
    return save_dir / kind / hookpoint(layer)


def train_coact(
    lm: LoadedModel, tokens: torch.Tensor, kind: str, layer: int, config: SaeTrainConfig,
    save_dir: Path,
) -> Path:  # fmt: skip
    """coact's own trainer on the contexts `tokens`, as the pipeline calls it; its folder."""
    folder = save_dir / kind / hookpoint(layer)
    if kind == "sae":
        ((sae, _),) = train_saes(lm, tokens, [Site("mlp_out", layer)], config).values()
        save_saelens(sae, folder)
    else:
        ((tc, _),) = train_transcoders(lm, tokens, [layer], config, skip=True).values()
        save_transcoder(tc, folder)
    return folder


def timed(train: Callable[[], Path]) -> tuple[Path, dict[str, Any]]:
    """train()'s result, with its wall and process CPU seconds and the load around it."""
    load_before, wall, cpu = os.getloadavg(), time.perf_counter(), time.process_time()
    folder = train()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return folder, {
        "wall_seconds": wall, "cpu_seconds": cpu,
        "load_before": list(load_before), "load_after": list(os.getloadavg()),
    }  # fmt: skip


def heldout_fvu(kind: str, folder: Path, held: Rows) -> float:
    """FVU of the MLP output (transcoder) or of its reconstruction (SAE), loaded by coact."""
    with torch.no_grad():
        if kind == "sae":
            return fvu(held[1], load_sae(folder)(held[1]))
        return fvu(held[1], load_transcoder(folder)(held[0]))


def sparsify_gap(kind: str, folder: Path, held: Rows) -> float:
    """Largest |coact's loader's output − `SparseCoder.load_from_disk`'s| on the rows."""
    from sparsify import SparseCoder

    x = held[0] if kind == "transcoder" else held[1]
    with torch.no_grad():
        theirs = SparseCoder.load_from_disk(folder)(x=x, y=held[1]).sae_out
        ours = load_transcoder(folder)(x) if kind == "transcoder" else load_sae(folder)(x)
    return float((theirs - ours).abs().max())


def run_trainer(kind: str, trainer: str, args: argparse.Namespace) -> dict[str, Any]:
    """One trainer end to end from the model, then its held-out FVU (in this process)."""
    lm = load_model(args.model)
    train_tokens, held_tokens = corpus_split(lm, args.tokens, args.held_contexts)
    config = SaeTrainConfig()
    train = train_coact if trainer == "coact" else train_sparsify
    with tempfile.TemporaryDirectory(prefix=f"bench-{trainer}-") as tmp:
        folder, measured = timed(
            lambda: train(lm, train_tokens, kind, args.layer, config, Path(tmp))
        )
        held = mlp_rows(lm, held_tokens, args.layer)
        n = train_tokens.shape[0] * (train_tokens.shape[1] - 1)
        result = {
            **measured, "tokens": n, "tokens_per_wall_s": n / measured["wall_seconds"],
            "tokens_per_cpu_s": n / measured["cpu_seconds"],
            "heldout_fvu": heldout_fvu(kind, folder, held), "threads": torch.get_num_threads(),
            "width": config.expansion * lm.adapter.d_model,
            "files": sorted(p.name for p in folder.iterdir()),
        }  # fmt: skip
        if trainer == "sparsify":
            result["max_abs_diff_vs_sparsify_loader"] = sparsify_gap(kind, folder, held)
    return result


def forward_costs(lm: LoadedModel, tokens: torch.Tensor, layer: int) -> dict[str, float]:
    """Process CPU seconds per 1,000 training tokens of the forward passes alone: sparsify's
    (the whole base model, `SPARSIFY_BATCH` contexts a pass) and coact's capture of the MLP's
    input and output (stopping after block `layer`, 16 contexts a pass)."""
    sites = [Site("mlp_in", layer), Site("mlp_out", layer)]
    per_1k = 1000 / (tokens.shape[0] * (tokens.shape[1] - 1))

    def cpu(run: Callable[[], object]) -> float:
        started = time.process_time()
        with torch.no_grad():
            run()
        return (time.process_time() - started) * per_1k

    step = SPARSIFY_BATCH
    model = lm.model.base_model
    return {
        "sparsify_whole_model": cpu(
            lambda: [model(tokens[i : i + step]) for i in range(0, tokens.shape[0], step)]
        ),
        "coact_capture": cpu(
            lambda: [capture(lm, tokens[i : i + 16], sites) for i in range(0, tokens.shape[0], 16)]
        ),
    }


def header(args: argparse.Namespace) -> dict[str, Any]:
    n_ctx = -(-args.tokens // 127)
    config = SaeTrainConfig()
    return {
        "model": args.model, "layer": args.layer, "expansion": config.expansion, "k": config.k,
        "train_contexts": n_ctx, "train_tokens": n_ctx * 127,
        "heldout_tokens": args.held_contexts * 127, "coact_batch_tokens": config.batch_tokens,
        "sparsify_batch_contexts": SPARSIFY_BATCH, "cpu_count": os.cpu_count(), "results": {},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=400_000)
    parser.add_argument("--held-contexts", type=int, default=32)
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--out", default=str(ROOT / "analyses/results/bench_sparsify_trainer.json"))
    parser.add_argument(
        "--forward-cost", type=int, metavar="CONTEXTS", help="only time the forward passes"
    )
    parser.add_argument("--one", nargs=2, metavar=("KIND", "TRAINER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out)
    if args.one:  # a child: one trainer, its result on stdout's last line
        kind, trainer = args.one
        print(json.dumps(run_trainer(kind, trainer, args)), flush=True)
        return
    result = header(args)
    if out.exists():
        kept = json.loads(out.read_text())
        if kept.get("train_tokens") == result["train_tokens"]:
            result = {**kept, **{k: v for k, v in result.items() if k != "results"}}
    if args.forward_cost:
        lm = load_model(args.model)
        sample = corpus_split(lm, args.forward_cost * 127, 0)[0]
        found = {"contexts": sample.shape[0], **forward_costs(lm, sample, args.layer)}
        result["forward_cpu_seconds_per_1k_tokens"] = found
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(found))
        return
    for kind in args.kinds:
        for trainer in TRAINERS:
            if trainer in result["results"].get(kind, {}):
                continue
            cmd = [sys.executable, __file__, *sys.argv[1:], "--one", kind, trainer]
            done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
            found = json.loads(done.stdout.strip().splitlines()[-1])
            result["results"].setdefault(kind, {})[trainer] = found
            print(kind, trainer, json.dumps(found), flush=True)
            out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
