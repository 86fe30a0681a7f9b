"""Adapters map site names to modules; the residual identities prove the mapping."""

from __future__ import annotations

import pytest
import torch

from coact.errors import CoactError
from coact.models.adapters import resolve
from coact.models.load import LoadedModel, load_model
from coact.models.sites import Site
from coact.models.tracing import capture, next_token_loss, spliced_logits

TOL = dict(atol=1e-5, rtol=1e-5)


def test_site_parse_forms() -> None:
    assert Site.parse("mlp_out[3]") == Site("mlp_out", 3)
    assert Site.parse("mlp_resid.2") == Site("mlp_resid", 2)
    assert Site.parse("blocks.4.hook_resid_post") == Site("resid_pre", 5)
    assert Site.parse("blocks.1.hook_mlp_out") == Site("mlp_out", 1)
    assert str(Site("attn_out", 0)) == "attn_out[0]" and Site("attn_out", 0).slug == "attn_out.0"
    with pytest.raises(CoactError, match="unknown site kind 'mlp_outt'"):
        Site.parse("mlp_outt[1]")
    with pytest.raises(CoactError, match="cannot read site"):
        Site.parse("layer three")


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(seed))


def test_residual_identities(tiny: LoadedModel) -> None:
    a = tiny.adapter
    ids = _tokens()
    kinds = ["resid_pre", "attn_out", "mlp_resid", "mlp_in", "mlp_out"]
    if not a.parallel:
        kinds.append("resid_mid")
    sites = [Site(k, 1) for k in kinds] + [Site("resid_pre", 2)]  # type: ignore[arg-type]
    acts = {str(s): v for s, v in capture(tiny, ids, sites).items()}
    pre, attn, mlp_out = acts["resid_pre[1]"], acts["attn_out[1]"], acts["mlp_out[1]"]
    nxt = acts["resid_pre[2]"]
    if a.parallel:
        torch.testing.assert_close(nxt, pre + attn + mlp_out, **TOL)
        torch.testing.assert_close(acts["mlp_resid[1]"], pre)
    else:
        torch.testing.assert_close(acts["resid_mid[1]"], pre + attn, **TOL)
        torch.testing.assert_close(nxt, acts["resid_mid[1]"] + mlp_out, **TOL)
        torch.testing.assert_close(acts["mlp_resid[1]"], acts["resid_mid[1]"])
    norm = resolve(tiny.model, f"{a.block(1)}.{a.mlp_norm}")
    with torch.no_grad():
        torch.testing.assert_close(acts["mlp_in[1]"], norm(acts["mlp_resid[1]"]), **TOL)


def test_last_resid_and_capture_stops_before_head(tiny: LoadedModel) -> None:
    calls = []
    head = tiny.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda *_: calls.append(1))
    try:
        capture(tiny, _tokens(), [Site("mlp_out", 0)])
        assert calls == []
        last = Site("resid_pre", tiny.adapter.n_layers)
        acts = capture(tiny, _tokens(), [last])
        assert acts[last].shape == (2, 9, tiny.adapter.d_model)
    finally:
        handle.remove()


@pytest.mark.parametrize("kind", ["resid_pre", "attn_out", "mlp_resid", "mlp_in", "mlp_out"])
def test_identity_splice_is_clean_and_zero_splice_matches_hook(kind: str) -> None:
    lm = load_model("tiny-llama")
    ids = _tokens(1)
    site = Site(kind, 1)  # type: ignore[arg-type]
    with torch.no_grad():
        clean = lm.model(ids).logits
    torch.testing.assert_close(spliced_logits(lm, ids, site, lambda x: x), clean)
    changed = spliced_logits(lm, ids, site, lambda x: 0.5 * x)
    assert (changed - clean).abs().max() > 1e-4


def test_zero_mlp_splice_equals_manual_hook() -> None:
    lm = load_model("tiny-gpt-neox")
    ids = _tokens(2)
    mlp = resolve(lm.model, f"{lm.adapter.block(1)}.mlp")
    handle = mlp.register_forward_hook(lambda _m, _i, out: torch.zeros_like(out))
    try:
        with torch.no_grad():
            expected = lm.model(ids).logits
    finally:
        handle.remove()
    got = spliced_logits(lm, ids, Site("mlp_out", 1), torch.zeros_like)
    torch.testing.assert_close(got, expected)


def test_next_token_loss_by_hand() -> None:
    # Two positions, vocabulary 2: uniform logits then a confident right guess.
    logits = torch.tensor([[[0.0, 0.0], [0.0, 10.0], [0.0, 0.0]]])
    tokens = torch.tensor([[0, 1, 1]])
    loss = next_token_loss(logits, tokens)
    expected = torch.tensor(
        [[torch.log(torch.tensor(2.0)), torch.log1p(torch.exp(torch.tensor(-10.0)))]]
    )
    torch.testing.assert_close(loss, expected)


def test_bad_sites_are_clear_errors() -> None:
    neox = load_model("tiny-gpt-neox")
    with pytest.raises(CoactError, match="layer 7 is out of range"):
        neox.adapter.check(Site("mlp_out", 7))
    with pytest.raises(CoactError, match="parallel residual"):
        neox.adapter.check(Site("resid_mid", 1))
    with pytest.raises(CoactError, match="out of range"):
        capture(neox, _tokens(), [Site("mlp_out", -1)])


def test_nan_activations_are_a_clear_error() -> None:
    lm = load_model("tiny-llama", seed=5)
    with torch.no_grad():
        resolve(lm.model, f"{lm.adapter.block(0)}.mlp.down_proj").weight[0, 0] = float("nan")
    with pytest.raises(CoactError, match=r"non-finite \(NaN or inf\) activations at mlp_out\[0\]"):
        capture(lm, _tokens(), [Site("mlp_out", 0)])


def test_mlp_splice_and_edit_by_hand(tiny: LoadedModel) -> None:
    """Replacing the MLP output by itself is the clean pass; editing the stream the MLP
    reads changes the MLP's output to exactly MLP(norm(edited)), brute force."""
    from coact.models.adapters import resolve
    from coact.models.tracing import mlp_output_after_edit, mlp_spliced_logits

    lm = tiny
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    clean = spliced_logits(lm, ids, None, None)
    torch.testing.assert_close(mlp_spliced_logits(lm, ids, 1, lambda s, o: o), clean)
    zeroed = spliced_logits(lm, ids, Site("mlp_out", 1), torch.zeros_like)
    got = mlp_spliced_logits(lm, ids, 1, lambda s, o: torch.zeros_like(o))
    torch.testing.assert_close(got, zeroed)
    stream = capture(lm, ids, [Site("mlp_resid", 1)])[Site("mlp_resid", 1)]
    edited_in, edited_out = mlp_output_after_edit(lm, ids, 1, lambda x: 0.5 * x)
    torch.testing.assert_close(edited_in, 0.5 * stream)
    point = lm.adapter.mlp_input_point(1)
    norm, mlp = resolve(lm.model, point.path), resolve(lm.model, lm.adapter.mlp_path(1))
    with torch.no_grad():
        torch.testing.assert_close(edited_out, mlp(norm(0.5 * stream)))
