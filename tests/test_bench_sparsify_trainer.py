"""analyses/bench_sparsify_trainer.py: sparsify's own `Trainer` run as its CLI runs it, on a
tiny Llama, writes checkpoints that coact's loaders read to sparsify's own outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from coact.models.load import LoadedModel, load_model
from coact.sae.train import SaeTrainConfig
from tests.scripts import analyses_script

CONFIG = SaeTrainConfig(expansion=2, k=4, batch_tokens=64)


bench = analyses_script("bench_sparsify_trainer")


@pytest.fixture(scope="module")
def llama() -> LoadedModel:
    return load_model("tiny-llama")


def _contexts(lm: LoadedModel, n: int, seed: int) -> torch.Tensor:
    """n contexts of 17 tokens: BOS, then ids that are never BOS."""
    bos = lm.tokenizer.bos_token_id
    body = torch.randint(
        bos + 1, lm.model.config.vocab_size, (n, 16), generator=torch.Generator().manual_seed(seed)
    )
    return torch.cat([torch.full((n, 1), bos), body], 1)


@pytest.mark.parametrize("kind", ["sae", "transcoder"])
def test_sparsify_checkpoint_reads_back_through_coact(
    llama: LoadedModel, kind: str, tmp_path: Path
) -> None:
    folder = bench.train_sparsify(llama, _contexts(llama, 20, 0), kind, 1, CONFIG, tmp_path, 8)
    from sparsify import SparseCoder

    state = torch.load(tmp_path / kind / "state.pt", weights_only=True)
    assert state["global_step"] == 3  # 20 contexts at 8 a step: the last one short
    assert torch.get_float32_matmul_precision() == "highest"
    held = bench.mlp_rows(llama, _contexts(llama, 4, 1), 1)
    assert bench.sparsify_gap(kind, folder, held) < 1e-5
    x = held[0] if kind == "transcoder" else held[1]
    with torch.no_grad():
        theirs = float(SparseCoder.load_from_disk(folder)(x=x, y=held[1]).fvu)
    assert bench.heldout_fvu(kind, folder, held) == pytest.approx(theirs, rel=1e-4)


def test_sparsify_refuses_bos_inside_contexts(llama: LoadedModel, tmp_path: Path) -> None:
    tokens = _contexts(llama, 8, 0)
    tokens[3, 5] = tokens[0, 0]  # excluding BOS would also drop this position
    with pytest.raises(ValueError, match="BOS"):
        bench.train_sparsify(llama, tokens, "sae", 1, CONFIG, tmp_path)


@pytest.mark.parametrize("kind", ["sae", "transcoder"])
def test_coact_checkpoint_beats_the_mean(llama: LoadedModel, kind: str, tmp_path: Path) -> None:
    folder = bench.train_coact(llama, _contexts(llama, 64, 0), kind, 1, CONFIG, tmp_path)
    held = bench.mlp_rows(llama, _contexts(llama, 8, 1), 1)
    assert bench.heldout_fvu(kind, folder, held) < 1.0


def test_forward_costs_are_cpu_seconds_of_both_passes(llama: LoadedModel) -> None:
    costs = bench.forward_costs(llama, _contexts(llama, 16, 0), 1)
    assert set(costs) == {"sparsify_whole_model", "coact_capture"}
    assert all(0 < seconds < 60 for seconds in costs.values())
