"""Model loading: local directories, the embedded SmolLM2, tiny models and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from coact.errors import CoactError
from coact.models.load import LoadedModel, load_model, tiny_model, tiny_tokenizer


def test_local_save_pretrained_directory_round_trips(tmp_path: Path) -> None:
    model, tokenizer = tiny_model("tiny-gpt-neox", seed=3), tiny_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    lm = load_model(str(tmp_path / "m"))
    assert lm.adapter.family == "gpt_neox" and lm.adapter.parallel
    ids = torch.tensor([[2, 40, 41, 42]])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, model(ids).logits)
    assert lm.fingerprint() == load_model(str(tmp_path / "m")).fingerprint()
    assert lm.fingerprint() != load_model("tiny-gpt-neox", seed=4).fingerprint()


def test_tiny_tokenizer_round_trips_bytes() -> None:
    tok = tiny_tokenizer()
    text = "naïve café — ok"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.bos_token_id == 2 and tok.eos_token_id == 0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("gpt-7", "unknown model 'gpt-7'"),
        ("./no/such/dir", "has no config.json"),
    ],
)
def test_bad_model_specs(spec: str, message: str) -> None:
    with pytest.raises(CoactError, match=message):
        load_model(spec)


def test_hub_id_without_network_is_one_clear_error() -> None:
    # conftest sets HF_HUB_OFFLINE=1: the hub is unreachable, as on a machine with no network.
    with pytest.raises(
        CoactError, match="cannot load model 'EleutherAI/pythia-70m-deduped'"
    ) as info:
        load_model("EleutherAI/pythia-70m-deduped")
    assert "\n" not in str(info.value) and "embedded default" in str(info.value)


def test_unsupported_family(tmp_path: Path) -> None:
    from transformers import BertConfig, BertLMHeadModel

    BertLMHeadModel(
        BertConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=300,
            is_decoder=True,
        )
    ).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(CoactError, match="unsupported model family 'bert'"):
        load_model(str(tmp_path))


@pytest.mark.slow
def test_embedded_smollm2_is_real(smollm2: LoadedModel) -> None:
    """The cached SmolLM2 predicts obvious continuations: real weights, not random ones."""
    assert smollm2.adapter.family == "llama" and smollm2.adapter.n_layers == 30
    assert smollm2.adapter.d_model == 576
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = smollm2.model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in smollm2.tokenizer.decode(out[0, ids.shape[1] :])
