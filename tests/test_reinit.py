"""The control model: the same architecture with every weight re-drawn by its own init."""

from __future__ import annotations

import pytest
import torch

from coact.models.load import TINY_MODELS, load_model, reinitialised


@pytest.mark.parametrize("kind", TINY_MODELS)
def test_every_weight_is_redrawn_with_its_shape_and_dtype(kind: str) -> None:
    lm = load_model(kind)
    with torch.no_grad():  # a marker no init draws: every parameter must lose it
        for p in lm.model.parameters():
            p.fill_(0.123)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    control = reinitialised(lm, seed=7)
    after = control.model.state_dict()
    assert after.keys() == before.keys()
    for name, p in control.model.named_parameters():
        assert p.shape == before[name].shape and p.dtype == before[name].dtype
        assert not torch.all(p == 0.123), f"{name} was not re-initialised"
    # the loaded model is untouched, the tokenizer is the same one
    for name, tensor in lm.model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert control.tokenizer is lm.tokenizer
    assert control.name != lm.name and control.fingerprint() != lm.fingerprint()


def test_weight_matrices_differ_from_the_loaded_model_and_norms_start_at_one() -> None:
    lm = load_model("tiny-llama", seed=0)
    control = reinitialised(lm, seed=0)
    loaded = dict(lm.model.named_parameters())
    for name, p in control.model.named_parameters():
        if p.ndim == 2:
            assert not torch.equal(p, loaded[name]), name
        else:  # RMSNorm weights: the architecture's init sets them to one
            assert torch.equal(p, torch.ones_like(p)), name
    std = control.model.get_input_embeddings().weight.std().item()
    assert std == pytest.approx(lm.model.config.initializer_range, rel=0.1)


def test_a_seed_gives_the_same_weights_and_another_seed_others() -> None:
    lm = load_model("tiny-gpt2")
    a, b, c = reinitialised(lm, 3), reinitialised(lm, 3), reinitialised(lm, 4)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    # tied weights stay tied after the re-draw
    assert a.model.get_output_embeddings().weight is a.model.get_input_embeddings().weight
    # the global random state is not consumed
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    reinitialised(lm, 3)
    assert torch.equal(torch.rand(3), expected)


def test_load_model_with_a_reinit_seed() -> None:
    direct = load_model("tiny-gpt-neox", reinit_seed=5)
    assert direct.fingerprint() == reinitialised(load_model("tiny-gpt-neox"), 5).fingerprint()
