"""Loss measurements under splices and noise, checked by hand or by brute force."""

from __future__ import annotations

import math
import warnings

import numpy as np
import polars as pl
import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from coact.calibrate.intervene import SpliceLosses, splice_summary, splice_table
from coact.calibrate.losses import bootstrap_mean_ratio, ce_and_kl, next_token_kl, resample_indices
from coact.calibrate.noise import NoiseKind, add_noise, noise_curve, sample_noise
from coact.errors import CoactError
from coact.models.adapters import resolve
from coact.models.load import LoadedModel, load_model
from coact.models.sites import Site
from coact.models.tracing import capture
from coact.sae.base import Sae
from coact.sae.evaluate import SaeEvalConfig, evaluate_sae

# Tiny forward passes: on a busy 2-core box, intra-op threads only wait on each other.
pytestmark = pytest.mark.usefixtures("one_thread")


def _tokens(n: int = 4, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 250, (n, length), generator=torch.Generator().manual_seed(seed))


def _greedy(lm: LoadedModel, n: int, length: int, seed: int = 0) -> torch.Tensor:
    """Contexts the model itself continues greedily: its clean predictions are right, so
    perturbing it must cost loss on average (a random model on random text is at chance)."""
    ids = _tokens(n, 1, seed)
    with torch.no_grad():
        for _ in range(length - 1):
            ids = torch.cat([ids, lm.model(ids).logits[:, -1:].argmax(-1)], 1)
    return ids


def _random_sae(
    d_in: int, width: int, *, k: int | None = 3, seed: int = 0, activation: str = "topk"
) -> Sae:
    g = torch.Generator().manual_seed(seed)
    sae = Sae(d_in, width, activation=activation, k=k)  # type: ignore[arg-type]
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, width, generator=g) / math.sqrt(d_in))
        sae.W_dec.copy_(torch.randn(width, d_in, generator=g) / math.sqrt(d_in))
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=g))
    return sae


# --- bootstrap -------------------------------------------------------------------------


def test_bootstrap_matches_a_loop_over_the_same_draws() -> None:
    rng = np.random.default_rng(3)
    num, den = rng.normal(size=(17, 3)), rng.integers(1, 9, size=17).astype(float)
    got = bootstrap_mean_ratio(num, den, n_boot=300, seed=5, level=0.9)
    stats = np.array([num[idx].sum(0) / den[idx].sum() for idx in resample_indices(17, 300, 5)])
    np.testing.assert_allclose(got.point, num.sum(0) / den.sum())
    np.testing.assert_allclose(got.low, np.quantile(stats, 0.05, axis=0))
    np.testing.assert_allclose(got.high, np.quantile(stats, 0.95, axis=0))


def test_bootstrap_interval_brackets_point_and_shrinks_with_contexts() -> None:
    rng = np.random.default_rng(0)
    widths = []
    for n_ctx in (20, 320):
        num, den = rng.normal(1.0, 1.0, size=n_ctx), np.full(n_ctx, 2.0)
        point, low, high = bootstrap_mean_ratio(num, den, n_boot=500, seed=1)
        assert low < point < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2.5  # ~1/sqrt(16) = 1/4 in theory


def test_splice_summary_by_hand() -> None:
    # two contexts of 2 and 3 predicted tokens; splices "a" and the baseline "zero"
    losses = SpliceLosses(
        names=["a", "zero"],
        ce_clean=np.array([2.0, 3.0]),
        n_tokens=np.array([2, 3]),
        ce=np.array([[3.0, 6.0], [3.0, 9.0]]),
        kl=np.array([[0.5, 2.0], [1.0, 4.0]]),
    )
    t = splice_summary(losses, reference="a", n_boot=0)
    assert t["splice"].to_list() == ["a", "zero"]
    assert t["ce_clean"][0] == pytest.approx(5 / 5)
    assert t["ce_spliced"].to_list() == pytest.approx([6 / 5, 15 / 5])
    assert t["delta_ce"].to_list() == pytest.approx([1 / 5, 10 / 5])
    assert t["kl"].to_list() == pytest.approx([1.5 / 5, 6 / 5])
    assert t["extra_delta_ce"].to_list() == pytest.approx([0.0, 9 / 5])
    assert t["extra_kl"].to_list() == pytest.approx([0.0, 4.5 / 5])
    # (CE_zero − CE_a) / (CE_zero − CE_clean) = (15 − 6) / (15 − 5)
    assert t["ce_recovered"].to_list() == pytest.approx([0.9, 0.0])
    assert t["n_tokens"][0] == 5 and t["n_contexts"][0] == 2
    assert "extra_delta_ce" not in splice_summary(losses, n_boot=0).columns


def test_bootstrap_zero_denominator_is_nan() -> None:
    point, low, high = bootstrap_mean_ratio(np.array([1.0, -1.0]), np.array([1.0, -1.0]), 50)
    assert np.isnan(point) and np.isfinite(low) and np.isfinite(high)  # replicates with Σ ≠ 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(bootstrap_mean_ratio(np.ones((3, 2)), np.zeros(3), 20).high).all()


# --- losses ----------------------------------------------------------------------------


def test_kl_by_hand_and_against_torch_distributions() -> None:
    # p = (1/2, 1/2), q = (1/4, 3/4): KL = 1/2 log 2 + 1/2 log(2/3); the last position of
    # a context predicts nothing and is dropped.
    clean = torch.tensor([[[0.0, 0.0], [5.0, 1.0]]])
    modified = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])
    expected = 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0)
    torch.testing.assert_close(next_token_kl(clean, modified), torch.tensor([[expected]]))
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, 7, generator=g), 3 * torch.randn(2, 5, 7, generator=g)
    brute = kl_divergence(Categorical(logits=a[:, :-1]), Categorical(logits=b[:, :-1]))
    torch.testing.assert_close(next_token_kl(a, b), brute)


def test_ce_and_kl_match_a_manual_hook_per_position() -> None:
    lm, ids, skip = load_model("tiny-llama"), _tokens(3, 10, seed=1), 2
    site = Site("mlp_out", 1)
    got = ce_and_kl(lm, ids, site, lambda x: 0.5 * x + 0.3, skip_first_positions=skip)

    def hook(_m: torch.nn.Module, _i: object, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[:, skip:] = 0.5 * out[:, skip:] + 0.3
        return out

    mlp = resolve(lm.model, f"{lm.adapter.block(1)}.mlp")
    handle = mlp.register_forward_hook(hook)
    try:
        with torch.no_grad():
            modified = lm.model(ids).logits
    finally:
        handle.remove()
    with torch.no_grad():
        clean = lm.model(ids).logits
    ce = torch.zeros(3, dtype=torch.float64)
    kl = torch.zeros(3, dtype=torch.float64)
    for c in range(3):
        for t in range(skip, ids.shape[1] - 1):  # logits at t predict token t + 1
            ce[c] += float(torch.nn.functional.cross_entropy(modified[c, t], ids[c, t + 1]))
            p, q = Categorical(logits=clean[c, t]), Categorical(logits=modified[c, t])
            kl[c] += float(kl_divergence(p, q))
    np.testing.assert_allclose(got.ce, ce.numpy(), rtol=1e-5)
    np.testing.assert_allclose(got.kl, kl.numpy(), rtol=1e-4, atol=1e-7)
    assert got.kl.min() > 1e-6
    np.testing.assert_array_equal(got.n_tokens, [10 - 1 - skip] * 3)
    clean_only = ce_and_kl(lm, ids, None, None, skip_first_positions=skip)
    assert (clean_only.kl == 0).all() and not np.allclose(clean_only.ce, got.ce)


# --- noise -----------------------------------------------------------------------------


def test_zero_strength_is_exactly_clean(tiny: LoadedModel) -> None:
    x = torch.randn(2, 3, 4)
    g = torch.Generator().manual_seed(0)
    assert add_noise(x, 0.0, "isotropic", generator=g, reference_variance=1.0) is x
    df = noise_curve(
        tiny, _tokens(), Site("mlp_resid", 1), [0.0, 1.0], "isotropic", batch_size=2, n_boot=50
    )
    zero, one = df.row(0, named=True), df.row(1, named=True)
    for col in ("delta_ce", "delta_ce_low", "delta_ce_high", "kl", "kl_low", "kl_high"):
        assert zero[col] == 0.0, col
    assert zero["realised_nmse"] == 0.0
    assert one["kl"] > 0 and one["delta_ce"] != 0.0
    assert (df["n_tokens"] == 4 * (12 - 1 - 1)).all() and (df["n_contexts"] == 4).all()


@pytest.mark.parametrize("kind", ["isotropic", "sae"])
def test_realised_noise_mse_matches_strength(kind: NoiseKind) -> None:
    g = torch.Generator().manual_seed(0)
    x = 2.0 * torch.randn(16, 64, 16, generator=g) + 1.0
    variance = float(x.reshape(-1, 16).var(0, unbiased=False).sum())
    sae = _random_sae(16, 40)
    for strength in (0.05, 3.0):
        n = sample_noise(x, strength, kind, generator=g, sae=sae, reference_variance=variance)
        realised = float(n.pow(2).sum(-1).mean()) / variance
        tol = 0.04 if kind == "isotropic" else 1e-5  # sae noise is rescaled exactly
        assert realised == pytest.approx(strength, rel=tol)


def test_sae_noise_lies_in_the_span_of_active_decoder_rows() -> None:
    d, width = 16, 40
    sae = _random_sae(d, width, seed=1)
    with torch.no_grad():
        sae.b_enc.fill_(-0.5)
    g = torch.Generator().manual_seed(2)
    x = 3.0 * torch.randn(50, d, generator=g)
    x[:5] = sae.b_dec.detach()  # centred input: every pre-activation is b_enc < 0
    codes = sae.encode(x).detach()
    n = sample_noise(x, 0.5, "sae", generator=g, sae=sae, reference_variance=1.0)
    assert (codes[:5] == 0).all() and (n[:5] == 0).all()  # no active feature, no noise
    w_dec = sae.W_dec.detach().double()
    inside: list[float] = []
    outside: list[float] = []
    for t in range(5, 50):
        active = codes[t].nonzero().squeeze(1)
        inactive = (codes[t] == 0).nonzero().squeeze(1)[: len(active)]
        nt = n[t].double()
        for rows, out in ((active, inside), (inactive, outside)):
            basis = w_dec[rows].T
            coef = torch.linalg.lstsq(basis, nt[:, None]).solution
            out.append(float((basis @ coef).squeeze(1).sub(nt).norm() / nt.norm()))
    assert max(inside) < 1e-5
    assert np.median(outside) > 0.5  # the check would catch noise off the active span


def test_sae_noise_is_invariant_to_moving_scale_between_codes_and_decoder() -> None:
    sae = _random_sae(8, 12, k=None, activation="relu", seed=4)
    scaled = _random_sae(8, 12, k=None, activation="relu", seed=4)
    factor = torch.linspace(0.2, 5.0, 12)
    with torch.no_grad():
        scaled.W_enc.mul_(factor)
        scaled.W_dec.div_(factor[:, None])
    x = torch.randn(30, 8, generator=torch.Generator().manual_seed(0))
    a, b = (
        sample_noise(
            x, 1.0, "sae", generator=torch.Generator().manual_seed(9), sae=s, reference_variance=1.0
        )
        for s in (sae, scaled)
    )
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_delta_ce_and_kl_grow_with_strength() -> None:
    lm = load_model("tiny-llama")
    site = Site("mlp_resid", 1)
    ids = _greedy(lm, 8, 20)
    sae = _random_sae(lm.adapter.d_model, 256, k=8, seed=3)
    kinds: tuple[NoiseKind, ...] = ("isotropic", "sae")
    for kind in kinds:
        df = noise_curve(lm, ids, site, [0.0, 1.0, 10.0], kind, sae=sae, n_boot=200)
        assert df["delta_ce"].to_list()[0] == 0.0
        assert df["delta_ce"].is_sorted() and df["kl"].is_sorted()
        assert df["delta_ce_low"][2] > df["delta_ce_high"][1] > 0  # intervals apart
        np.testing.assert_allclose(df["realised_nmse"][1:], [1.0, 10.0], rtol=0.05)
    again = noise_curve(lm, ids, site, [0.0, 1.0, 10.0], "sae", sae=sae, n_boot=200)
    assert again.equals(df)


# --- splices ---------------------------------------------------------------------------


def test_splice_table_identity_zero_and_sae_agree_with_evaluate_sae() -> None:
    lm, ids, site = load_model("tiny-gpt-neox"), _tokens(6, 12, seed=4), Site("mlp_out", 1)
    sae = _random_sae(lm.adapter.d_model, 128, k=8, seed=5)
    splices = {"identity": lambda x: x, "sae": lambda x: sae.decode(sae.encode(x))}
    df = splice_table(lm, ids, site, splices, batch_size=4, n_boot=200)
    assert df["splice"].to_list() == ["identity", "sae", "zero"]
    rows = {r["splice"]: r for r in df.iter_rows(named=True)}
    ident, spliced, zero = rows["identity"], rows["sae"], rows["zero"]
    assert ident["delta_ce"] == 0.0 and abs(ident["kl"]) < 1e-6
    assert ident["ce_recovered"] == 1.0 and zero["ce_recovered"] == 0.0
    assert spliced["kl"] > 1e-6 and zero["kl"] > 1e-6 and zero["kl"] != spliced["kl"]
    assert spliced["delta_ce_low"] <= spliced["delta_ce"] <= spliced["delta_ce_high"]
    assert spliced["ce_recovered_low"] <= spliced["ce_recovered"] <= spliced["ce_recovered_high"]
    report = evaluate_sae(lm, sae, site, ids, SaeEvalConfig(forward_batch=4))
    ce_clean = spliced["ce_clean"]
    assert ce_clean == pytest.approx(report.ce_clean, rel=1e-6)
    assert spliced["ce_spliced"] == pytest.approx(report.ce_spliced, rel=1e-6)
    assert zero["ce_spliced"] == pytest.approx(report.ce_ablated, rel=1e-6)
    by_hand = (zero["ce_spliced"] - spliced["ce_spliced"]) / (zero["ce_spliced"] - ce_clean)
    assert spliced["ce_recovered"] == pytest.approx(by_hand, rel=1e-9)
    # evaluate_sae sums in float32; the gap on a random model is small, hence rel 1e-3
    assert spliced["ce_recovered"] == pytest.approx(report.ce_recovered, rel=1e-3)
    assert (df["n_tokens"] == 6 * 10).all() and (df["n_contexts"] == 6).all()


def test_noise_curve_reference_variance_is_the_total_variance() -> None:
    lm, ids, site = load_model("tiny-gpt2"), _tokens(4, 10, seed=6), Site("mlp_out", 0)
    df = noise_curve(lm, ids, site, [0.5], "isotropic", n_boot=10)
    x = capture(lm, ids, [site])[site][:, 1:].reshape(-1, lm.adapter.d_model).double()
    assert df["reference_variance"][0] == pytest.approx(float(x.var(0, unbiased=False).sum()))
    assert isinstance(df, pl.DataFrame)


def test_bad_requests_are_clear_errors() -> None:
    lm, ids, site = load_model("tiny-llama"), _tokens(), Site("mlp_out", 1)
    with pytest.raises(CoactError, match="needs an SAE"):
        noise_curve(lm, ids, site, [1.0], "sae")
    with pytest.raises(CoactError, match="finite number"):
        noise_curve(lm, ids, site, [-1.0], "isotropic")
    with pytest.raises(CoactError, match="unknown noise kind"):
        noise_curve(lm, ids, site, [1.0], "pink")  # type: ignore[arg-type]
    with pytest.raises(CoactError, match="reserved"):
        splice_table(lm, ids, site, {"zero": lambda x: 0 * x})
    with pytest.raises(CoactError, match="no predicted position"):
        ce_and_kl(lm, ids[:, :2], site, None, skip_first_positions=1)
    with pytest.raises(CoactError, match="reads 8-dim"):
        noise_curve(lm, ids, site, [1.0], "sae", sae=_random_sae(8, 16))
