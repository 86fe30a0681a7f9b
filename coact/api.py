"""The Python API: one call per stage, with the embedded defaults of the CLI."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from coact.codes.collect import CollectConfig, collect_codes
from coact.codes.corpus import Contexts, CorpusConfig, build_contexts
from coact.codes.store import CodeStore
from coact.models.load import LoadedModel, load_model
from coact.models.sites import Site
from coact.pipeline.checks import check_run_dir, config_kept_on_failure
from coact.pipeline.config import AnalyzeConfig
from coact.pipeline.executor import Execution
from coact.pipeline.run import analyze as run_pipeline
from coact.pipeline.summary import ModelSummary, RunSummary
from coact.rundir.layout import RunLayout
from coact.sae.base import Sae, SparseAutoencoder
from coact.sae.formats import load_sae, save_saelens
from coact.sae.train import SaeTrainConfig, train_saes


def analyze(config: AnalyzeConfig, execution: Execution | None = None) -> RunSummary | ModelSummary:
    """The whole pipeline (`coact analyze`), after the run directory is checked; a run that
    fails leaves its config.json as it found it, so a resumed run reads its own settings."""
    run_dir = config.resolved_run_dir()
    check_run_dir(run_dir)
    with config_kept_on_failure(RunLayout(run_dir, run_dir).config):
        return run_pipeline(config, execution)


def train_sae(
    site: str | Site,
    *,
    model: str = AnalyzeConfig.model,
    corpus: str = AnalyzeConfig.corpus,
    tokens: int = AnalyzeConfig.sae_tokens,
    expansion: int = SaeTrainConfig.expansion,
    k: int = SaeTrainConfig.k,
    ctx_len: int = AnalyzeConfig.ctx_len,
    device: str = AnalyzeConfig.device,
    seed: int = AnalyzeConfig.seed,
    out: str | Path | None = None,
) -> Sae:
    """Train a TopK SAE at `site`; saved in the SAELens format when `out` is given."""
    where = site if isinstance(site, Site) else Site.parse(site)
    lm, contexts = _model_and_contexts([where], model, corpus, tokens, ctx_len, device, seed)
    config = SaeTrainConfig(expansion=expansion, k=k, seed=seed)
    sae, _ = train_saes(lm, contexts.tokens, [where], config)[where]
    if out is not None:
        save_saelens(sae, out)
    return sae


def collect(
    saes: Mapping[str | Site, str | Path | SparseAutoencoder],
    *,
    out: str | Path,
    model: str = AnalyzeConfig.model,
    corpus: str = AnalyzeConfig.corpus,
    tokens: int = AnalyzeConfig.tokens,
    ctx_len: int = AnalyzeConfig.ctx_len,
    device: str = AnalyzeConfig.device,
    seed: int = AnalyzeConfig.seed,
    config: CollectConfig | None = None,
) -> CodeStore:
    """Encode `tokens` of `corpus` with SAEs given as {site: SAE or path}; resumable."""
    resolved = {
        (s if isinstance(s, Site) else Site.parse(s)): (
            v if isinstance(v, SparseAutoencoder) else load_sae(v, device=device)
        )
        for s, v in saes.items()
    }
    lm, contexts = _model_and_contexts(list(resolved), model, corpus, tokens, ctx_len, device, seed)
    return collect_codes(lm, contexts, resolved, out, config or CollectConfig())


def _model_and_contexts(
    sites: list[Site], model: str, corpus: str, tokens: int, ctx_len: int, device: str, seed: int
) -> tuple[LoadedModel, Contexts]:
    """The model (every site checked against it) and `tokens` of `corpus` in contexts."""
    lm = load_model(model, device=device, seed=seed)
    for site in sites:
        lm.adapter.check(site)
    settings = CorpusConfig(source=corpus, ctx_len=ctx_len, n_tokens=tokens, seed=seed)
    return lm, build_contexts(settings, lm.tokenizer)
