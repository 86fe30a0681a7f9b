"""The offline parts of analyses/replicate_seed.py: the published-SAE presets, the hub ids
their templates give per layer (and that those ids load, the download replaced by files
written here in the seed's format), and the seed's figures printed beside coact's."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import huggingface_hub
import polars as pl
import pytest
import torch

from coact.sae.formats import load_sae

SCRIPT = Path(__file__).resolve().parents[1] / "analyses" / "replicate_seed.py"


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("replicate_seed", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["replicate_seed"] = module
    spec.loader.exec_module(module)
    return module


def test_defaults_are_unchanged(script: ModuleType) -> None:
    args = script.parse_args([])
    assert (args.model, args.layers, args.published) == ("smollm2-135m", "1,2", None)
    assert args.sae_in_template is None and args.sae_out_template is None


def test_seed_preset_names_the_seed_saes(script: ModuleType) -> None:
    args = script.parse_args(["--published", "seed"])
    assert args.model == "EleutherAI/pythia-70m-deduped" and script.is_seed_model(args.model)
    assert script.parse_layers(args.layers) == [1, 2, 3, 4, 5]
    repo = "hf://jbrinkma/Pythia-70M-deduped-SAEs"
    assert script.sae_source(args.sae_in_template, 3) == f"{repo}/Pythia-70M-deduped-res-2.pt"
    assert script.sae_source(args.sae_out_template, 3) == f"{repo}/Pythia-70M-deduped-mlp-3.pt"
    own = script.parse_args(["--published", "seed", "--layers", "2", "--model", "m"])
    assert (own.model, own.layers) == ("m", "2")


def test_marks_preset(script: ModuleType) -> None:
    args = script.parse_args(["--published", "marks"])
    got = script.sae_source(args.sae_in_template, 4)
    assert got.endswith(".zip/dictionaries/pythia-70m-deduped/resid_out_layer3/10_32768")
    assert script.sae_source(args.sae_out_template, 4).endswith("mlp_out_layer4/10_32768")


def test_seed_preset_ids_load(
    script: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The preset's ids for layer 3, fetched from a stand-in hub holding state-dict files
    of the seed's layout: d_model 512 in, 3,072 latents, as check_sae_fits will see them."""
    repo = tmp_path / "jbrinkma/Pythia-70M-deduped-SAEs"
    repo.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    for name in ("res-2", "mlp-3"):
        state = {"encoder": torch.randn(3072, 512, generator=gen) * 0.01}
        state |= {"encoder_bias": torch.zeros(3072), "decoder": torch.randn(3072, 512)}
        torch.save(state, repo / f"Pythia-70M-deduped-{name}.pt")

    def hf_hub_download(repo_id: str, filename: str, **_: Any) -> str:
        return str(tmp_path / repo_id / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    args = script.parse_args(["--published", "seed"])
    for template in (args.sae_in_template, args.sae_out_template):
        sae = load_sae(script.sae_source(template, 3))
        assert (sae.d_in, sae.width, sae.site) == (512, 3072, None)


def test_seed_figures_printed_beside(script: ModuleType, capsys: pytest.CaptureFixture) -> None:
    assert script.seed_reference_line([1, 3, 6]) == "layer 1 78.8 %, layer 3 97.8 %"
    row = {"layer": 3, "alive": 100, "dead": 2, "percent_linear_seed": 91.0}
    row |= {"percent_linear_fvu": 80.0, "seed_reference_percent": 97.8}
    row |= {"layer_norm": 1.5, "seed_scale": 0.9}
    family = {"layer": 3, "family": "linear", "final_loss": 0.1, "train_nmse": 0.2}
    family |= {"heldout_nmse": 0.3, "heldout_seed_mse": 1e-3}
    script.print_tables(pl.DataFrame([row]), pl.DataFrame([family]), 0.001)
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("3 "))
    assert "91.0%" in line and "97.8%" in line
