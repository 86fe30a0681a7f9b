"""The trainer recovers a planted dictionary; evaluation matches brute-force answers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from coact.models.load import load_model
from coact.models.sites import Site
from coact.models.tracing import capture
from coact.sae.base import Sae
from coact.sae.evaluate import SaeEvalConfig, evaluate_sae, evaluate_saes
from coact.sae.train import SaeTrainConfig, SaeTrainer, dense_loss, train_saes


def _planted(n: int, d: int, atoms: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Each row is a sum of k random atoms with positive magnitudes, plus an offset."""
    idx = torch.rand(n, atoms.shape[0], generator=gen).topk(k, dim=-1).indices
    mags = 1 + torch.rand(n, k, generator=gen)
    codes = torch.zeros(n, atoms.shape[0]).scatter_(-1, idx, mags)
    return codes @ atoms + 3.0


def test_topk_trainer_recovers_planted_dictionary() -> None:
    gen = torch.Generator().manual_seed(0)
    d, n_atoms, k = 16, 32, 2
    atoms = F.normalize(torch.randn(n_atoms, d, generator=gen), dim=-1)
    config = SaeTrainConfig(expansion=2, k=k, batch_tokens=256, lr=3e-3, dead_after_tokens=5_000)
    trainer = SaeTrainer(_planted(256, d, atoms, k, gen), config, gen)
    for _ in range(1500):
        trainer.step(_planted(256, d, atoms, k, gen))
    sae = trainer.finish()
    test = _planted(4096, d, atoms, k, gen)
    recon = sae.decode(sae.encode(test))
    fve = 1 - (test - recon).pow(2).sum() / (test - test.mean(0)).pow(2).sum()
    assert fve > 0.9
    cosine = F.normalize(sae.W_dec, dim=-1) @ atoms.T  # (width, n_atoms)
    recovered = (cosine.max(0).values > 0.9).float().mean()
    assert recovered > 0.8, f"only {recovered:.2f} of planted atoms found"
    assert (sae.encode(test) > 0).sum(-1).float().mean() <= k


@pytest.mark.parametrize("dead_after", [10**9, 200])
def test_sparse_step_has_the_gradients_of_the_dense_loss(dead_after: int) -> None:
    """The step's gradients over chosen latents equal autograd through full-width codes,
    with and without AuxK (dead latents appear after 200 tokens of silence)."""
    gen = torch.Generator().manual_seed(3)
    d, n = 12, 96
    data = 2 + torch.randn(n, d, generator=gen) @ torch.randn(d, d, generator=gen)
    config = SaeTrainConfig(expansion=4, k=3, dead_after_tokens=dead_after)
    trainer = SaeTrainer(data, config, gen)
    for _ in range(6):
        batch = data[torch.randperm(n, generator=gen)[:64]]
        sae = trainer.sae
        sae.zero_grad()  # the step's own optimizer step is held back to compare gradients
        seen = trainer.log.tokens_seen + batch.shape[0]
        dense_loss(trainer, batch, seen).backward()
        dense = {name: p.grad.clone() for name, p in sae.named_parameters()}
        optimizer_step, trainer.optimizer.step = trainer.optimizer.step, lambda: None
        trainer.step(batch)
        trainer.optimizer.step = optimizer_step
        for name, p in sae.named_parameters():
            torch.testing.assert_close(p.grad, dense[name], rtol=1e-4, atol=1e-6, msg=name)
        trainer.optimizer.step()
        with torch.no_grad():
            sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True))
    if dead_after < 10**9:
        assert max(trainer.log.dead_fraction) > 0, "AuxK was never exercised"


def test_scale_folding_keeps_codes_and_reconstruction() -> None:
    gen = torch.Generator().manual_seed(1)
    data = 50 * torch.randn(512, 8, generator=gen)
    trainer = SaeTrainer(data, SaeTrainConfig(expansion=2, k=4), gen)
    trainer.step(data)
    scale = trainer.scale
    sae = trainer.sae
    codes_scaled = sae.encode(data / scale).detach()
    recon_scaled = sae.decode(codes_scaled).detach() * scale
    folded = trainer.finish()
    torch.testing.assert_close(folded.encode(data), codes_scaled, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        folded.decode(folded.encode(data)), recon_scaled, atol=1e-3, rtol=1e-4
    )


def _exact_sae(d: int, site: str) -> Sae:
    """relu([x, −x]) then [I; −I]: reconstructs every input exactly."""
    sae = Sae(d, 2 * d, activation="relu", subtract_decoder_bias=False, site=site)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
    return sae.requires_grad_(False)


def test_evaluate_exact_and_zero_sae_against_brute_force() -> None:
    lm = load_model("tiny-llama")
    site = Site("mlp_out", 1)
    tokens = torch.randint(3, 250, (4, 12), generator=torch.Generator().manual_seed(0))
    exact = evaluate_sae(lm, _exact_sae(lm.adapter.d_model, str(site)), site, tokens)
    # Clean CE by hand: predictions from positions 1..10 (BOS position 0 is skipped).
    with torch.no_grad():
        logits = lm.model(tokens).logits
    ce = F.cross_entropy(logits[:, 1:-1].reshape(-1, logits.shape[-1]), tokens[:, 2:].reshape(-1))
    assert abs(exact.ce_clean - float(ce)) < 1e-5
    assert abs(exact.ce_spliced - exact.ce_clean) < 1e-5
    assert abs(exact.fve - 1.0) < 1e-5 and abs(exact.ce_recovered - 1.0) < 1e-3
    assert exact.n_tokens == 4 * 11
    assert abs(exact.l0 - lm.adapter.d_model) < 1e-6  # every coordinate is non-zero
    zero = Sae(lm.adapter.d_model, 8, activation="relu", site=str(site)).requires_grad_(False)
    report = evaluate_sae(lm, zero, site, tokens)
    x = capture(lm, tokens, [site])[site][:, 1:].reshape(-1, lm.adapter.d_model)
    expected_fve = 1 - x.pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert abs(report.fve - float(expected_fve)) < 1e-4
    assert report.l0 == 0 and report.dead_fraction == 1.0
    assert abs(report.ce_spliced - report.ce_ablated) < 1e-6 and abs(report.ce_recovered) < 1e-6


def test_evaluating_saes_together_matches_evaluating_each_alone() -> None:
    lm = load_model("tiny-llama")
    tokens = torch.randint(3, 250, (5, 12), generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    saes = {}
    for site in (Site("attn_out", 0), Site("mlp_out", 1), Site("resid_pre", 1)):
        sae = Sae(lm.adapter.d_model, 16, activation="topk", k=4, site=str(site))
        for p in sae.parameters():
            p.data = torch.randn(p.shape, generator=gen) * 0.3
        saes[site] = sae.requires_grad_(False)
    config = SaeEvalConfig(forward_batch=2)  # three batches, the last one short
    together = evaluate_saes(lm, saes, tokens, config)
    for site, sae in saes.items():
        alone = evaluate_sae(lm, sae, site, tokens, config)
        assert together[site].site == str(site)
        for field in (
            "n_tokens",
            "fve",
            "l0",
            "dead_fraction",
            "ce_clean",
            "ce_spliced",
            "ce_ablated",
        ):
            assert getattr(together[site], field) == pytest.approx(getattr(alone, field), rel=1e-6)
    assert together[Site("attn_out", 0)].ce_spliced != together[Site("mlp_out", 1)].ce_spliced


def test_train_saes_streams_from_model() -> None:
    lm = load_model("tiny-gpt-neox")
    tokens = torch.randint(3, 250, (32, 16), generator=torch.Generator().manual_seed(0))
    sites = [Site("mlp_resid", 1), Site("mlp_out", 1)]
    config = SaeTrainConfig(k=8, buffer_contexts=16, batch_tokens=64)
    out = train_saes(lm, tokens, sites, config)
    assert set(out) == set(sites)
    for site, (sae, log) in out.items():
        assert sae.site == str(site) and sae.width == 4 * lm.adapter.d_model
        assert log.tokens_seen == 32 * 15 and len(log.fvu) == 2 * 4
        assert log.fvu[-1] < log.fvu[0]


def test_mlp_resid_and_the_stream_it_names_are_one_site_either_way_round() -> None:
    from coact.errors import CoactError
    from coact.models.sites import Site
    from coact.sae.base import Sae
    from coact.sae.evaluate import check_sae_fits

    def sae_for(label: str) -> Sae:
        return Sae(8, 16, activation="relu", site=label)

    # Parallel model (Pythia): the MLP reads resid_pre.
    check_sae_fits(sae_for("resid_pre[1]"), Site("mlp_resid", 1), 8, "resid_pre")
    check_sae_fits(sae_for("mlp_resid[1]"), Site("resid_pre", 1), 8, "resid_pre")
    with pytest.raises(CoactError, match="trained for site resid_mid"):
        check_sae_fits(sae_for("resid_mid[1]"), Site("mlp_resid", 1), 8, "resid_pre")
    # Sequential model (Llama): it reads resid_mid.
    check_sae_fits(sae_for("resid_mid[1]"), Site("mlp_resid", 1), 8, "resid_mid")
    with pytest.raises(CoactError, match="trained for site resid_pre"):
        check_sae_fits(sae_for("resid_pre[1]"), Site("mlp_resid", 1), 8, "resid_mid")
    with pytest.raises(CoactError, match="trained for site resid_pre"):
        check_sae_fits(sae_for("resid_pre[2]"), Site("mlp_resid", 1), 8, "resid_pre")
