"""What the layers of a run share, prepared once: SAEs (given, reused or trained), their
evaluations and the code store. A single-layer run keeps them in its own directory; a
model run's layers share the model run's (`coact.rundir.layout`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import numpy as np

from coact.block.stage import block_sites
from coact.codes.collect import collect_codes, sae_fingerprint
from coact.codes.corpus import Contexts, CorpusConfig, build_contexts
from coact.codes.store import CodeStore
from coact.connectors.config import ConnectConfig
from coact.connectors.train import split_rows
from coact.errors import CoactError
from coact.models.load import LoadedModel
from coact.models.sites import Site
from coact.pipeline.config import BLOCK_STAGES, AnalyzeConfig, run_model
from coact.pipeline.executor import Execution, run_on_ray
from coact.rundir.claims import claimed
from coact.rundir.files import write_json
from coact.rundir.layout import RunLayout
from coact.rundir.results import Timings
from coact.sae.base import SparseAutoencoder
from coact.sae.evaluate import (
    SaeEvalConfig,
    SaeEvaluation,
    SaeReport,
    check_sae_fits,
    evaluate_saes,
)
from coact.sae.formats import load_sae, save_saelens
from coact.sae.train import train_saes

EVAL_GROUP = 16  # SAEs evaluated per shared capture and clean pass (a killed run loses ≤ one group)
# trains groups of SAEs (each one pass over the model) and saves them: `train_here`, or
# `groups_on_ray`; (model, training contexts, groups, config, layout, recipe id) → the SAEs
GroupTrainer = Callable[
    [LoadedModel, Contexts, list[list[Site]], AnalyzeConfig, RunLayout, str],
    dict[Site, SparseAutoencoder],
]


@dataclass
class Shared:
    """What the layers of a run share: SAEs, their evaluations, the code store."""

    layout: RunLayout
    saes: dict[Site, SparseAutoencoder]
    given: dict[Site, str | None]
    reports: dict[Site, SaeReport]
    store: CodeStore
    code_part: Contexts
    trained_now: list[str]
    evaluated_now: list[str]
    timings: dict[str, float]


def layer_sites(config: AnalyzeConfig, layer: int) -> list[Site]:
    """The sites a layer's stages read: the MLP's input and output, and with the block
    stages also attention's input and output and the next residual stream."""
    sites = [Site("mlp_resid", layer), Site("mlp_out", layer)]
    if any(config.runs(stage) for stage in BLOCK_STAGES):
        sites += [s for s in block_sites(layer).values() if s not in sites]
    return sites


def prepare(
    config: AnalyzeConfig,
    lm: LoadedModel,
    sites: Sequence[Site],
    given: dict[Site, str | None],
    layout: RunLayout,
    train: GroupTrainer | None = None,
) -> Shared:
    """SAEs (given, reused or trained: here, or by `train`), their evaluations and the code
    store of `sites`. For parallel-residual models mlp_resid[ℓ] is resid_pre[ℓ]: both names
    get one SAE."""
    for site in sites:
        lm.adapter.check(site)
    alias = {
        s: Site("resid_pre", s.layer)
        for s in sites
        if s.kind == "mlp_resid" and lm.adapter.parallel and Site("resid_pre", s.layer) in sites
    }
    saes: dict[Site, SparseAutoencoder] = {}
    for site, source in given.items():
        if source is not None:
            saes[site] = load_sae(source, device=config.device)
            check_sae_fits(saes[site], site, lm.adapter.d_model, lm.adapter.mlp_resid_kind())
    to_train = [s for s in sites if s not in saes and s not in alias]

    train_part, code_part = run_contexts(config, lm)
    layout.run_dir.mkdir(parents=True, exist_ok=True)
    write_json(layout.config, asdict(config))
    timings = Timings()
    trained_now: list[str] = []
    if to_train:
        with timings.part("train_saes"):
            trained, trained_now = _trained_saes(lm, train_part, to_train, config, layout, train)
            saes.update(trained)
    for site, same in alias.items():
        if site not in saes:
            saes[site] = saes[same]

    with timings.part("evaluate_saes"):
        eval_tokens = code_part.tokens[: config.eval_contexts]
        reports, evaluated_now = _evaluations(lm, saes, eval_tokens, layout)

    with timings.part("collect"):
        ordered = {site: saes[site] for site in sites}
        store = collect_codes(lm, code_part, ordered, layout.codes, config.collect)
    return Shared(
        layout, saes, given, reports, store, code_part, trained_now, evaluated_now, timings
    )


def run_contexts(config: AnalyzeConfig, lm: LoadedModel) -> tuple[Contexts, Contexts]:
    """(contexts that train the SAEs, contexts whose codes are stored: after the training
    ones, or after `code_offset_tokens`): the same corpus slices on every call, so a later
    stage (calibration) can rebuild them."""
    per_context = config.ctx_len - 1
    n_code_ctx = -(-config.tokens // per_context)
    training = config.sae_in is None or config.sae_out is None
    n_train_ctx = -(-config.sae_tokens // per_context) if training else 0
    offset = config.code_offset_tokens
    n_skip_ctx = n_train_ctx if offset is None else -(-offset // per_context)
    contexts = build_contexts(
        CorpusConfig(
            source=config.corpus,
            ctx_len=config.ctx_len,
            n_tokens=(max(n_train_ctx, n_skip_ctx) + n_code_ctx) * per_context,
            seed=config.seed,
        ),
        lm.tokenizer,
    )
    if contexts.tokens.shape[0] <= max(n_train_ctx, n_skip_ctx):
        raise CoactError(
            f"corpus {config.corpus!r} gave {contexts.n_tokens} tokens, all needed to train the "
            f"SAEs ({config.sae_tokens}) or skipped before the codes; lower --sae-tokens or use "
            "a larger corpus"
        )
    return _slice(contexts, 0, n_train_ctx), _slice(contexts, n_skip_ctx, contexts.tokens.shape[0])


def calibration_tokens(code_part: Contexts, store: CodeStore, connect: ConnectConfig) -> Any:
    """The contexts the connectors held out (the same split `connect` used), as tokens."""
    groups = store.read_tokens()["context"].to_numpy()
    _, held = split_rows(len(groups), connect.heldout_fraction, connect.seed, groups)
    return code_part.tokens[np.unique(groups[held])]


def _slice(contexts: Contexts, lo: int, hi: int) -> Contexts:
    digest = hashlib.sha256(f"{contexts.fingerprint}:{lo}:{hi}".encode()).hexdigest()
    return dataclasses.replace(
        contexts,
        tokens=contexts.tokens[lo:hi],
        doc_ids=contexts.doc_ids[lo:hi],
        fingerprint=digest,
    )


def _evaluations(
    lm: LoadedModel, saes: dict[Site, SparseAutoencoder], tokens: Any, layout: RunLayout
) -> tuple[dict[Site, SaeReport], list[str]]:
    """Each SAE's report, reused when the model, the SAE's weights and the evaluation
    tokens are those of a finished earlier evaluation (its file carries their key)."""
    reports: dict[Site, SaeReport] = {}
    evaluated: list[str] = []
    eval_config = SaeEvalConfig()
    token_digest = hashlib.sha256(np.ascontiguousarray(np.asarray(tokens)).tobytes()).hexdigest()
    keys: dict[Site, str] = {}
    for site, sae in saes.items():
        keys[site] = hashlib.sha256(
            json.dumps(
                [lm.fingerprint(), sae_fingerprint(sae), token_digest, str(site),
                 asdict(eval_config)], sort_keys=True,
            ).encode()
        ).hexdigest()  # fmt: skip
        saved = SaeEvaluation.read(layout.sae_evaluation(site.slug))
        if saved is not None and saved.key == keys[site]:
            reports[site] = saved.report
    # the rest together, a group at a time (each one's report is saved as it lands)
    todo = [site for site in saes if site not in reports]
    if todo:
        layout.sae_eval.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(todo), EVAL_GROUP):
        group = todo[start : start + EVAL_GROUP]
        for site, report in evaluate_saes(
            lm, {s: saes[s] for s in group}, tokens, eval_config
        ).items():
            reports[site] = report
            SaeEvaluation(key=keys[site], report=report).write(layout.sae_evaluation(site.slug))
            evaluated.append(str(site))
    return reports, evaluated


def _trained_saes(
    lm: LoadedModel,
    contexts: Contexts,
    sites: list[Site],
    config: AnalyzeConfig,
    layout: RunLayout,
    train: GroupTrainer | None = None,
) -> tuple[dict[Site, SparseAutoencoder], list[str]]:
    """Reuse SAEs an earlier run trained with the same recipe; train the rest together, at
    most `config.sae_group` per pass over the model (each is saved when its pass ends), in
    this process or by `train` (`groups_on_ray`)."""
    recipe_id = sae_recipe(lm, contexts, config)
    found = _found_saes(sites, recipe_id, layout, config.device)
    missing = [site for site in sites if site not in found]
    group = max(1, config.sae_group)
    groups = [missing[start : start + group] for start in range(0, len(missing), group)]
    if groups:
        found.update((train or train_here)(lm, contexts, groups, config, layout, recipe_id))
    return found, [str(site) for site in missing]


def sae_recipe(lm: LoadedModel, contexts: Contexts, config: AnalyzeConfig) -> str:
    """What an SAE trained by this run depends on, hashed: the model, the training
    contexts and the training settings (an SAE whose metadata carries it is reused)."""
    recipe = {
        "model": lm.fingerprint(),
        "corpus": contexts.fingerprint,
        "train": asdict(config.sae),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def _found_saes(
    sites: Sequence[Site], recipe_id: str, layout: RunLayout, device: str
) -> dict[Site, SparseAutoencoder]:
    """The SAEs at `sites` saved with this recipe (by an earlier run, or another writer)."""
    found: dict[Site, SparseAutoencoder] = {}
    for site in sites:
        if layout.sae_dir(site.slug).is_dir():
            try:
                sae = load_sae(layout.sae_dir(site.slug), device=device)
            except CoactError:
                continue  # half-written or not ours: trained again
            if sae.metadata.get("recipe") == recipe_id:
                found[site] = sae
    return found


def train_here(
    lm: LoadedModel,
    contexts: Contexts,
    groups: list[list[Site]],
    config: AnalyzeConfig,
    layout: RunLayout,
    recipe_id: str,
) -> dict[Site, SparseAutoencoder]:
    """Each group in this process, one pass over the model after another."""
    trained: dict[Site, SparseAutoencoder] = {}
    for part in groups:
        trained.update(train_group(lm, contexts.tokens, part, config, layout, recipe_id))
    return trained


def train_group(
    lm: LoadedModel,
    tokens: Any,
    part: Sequence[Site],
    config: AnalyzeConfig,
    layout: RunLayout,
    recipe_id: str,
) -> dict[Site, SparseAutoencoder]:
    """The SAEs at `part`, trained together in one pass, each saved with its train log."""
    trained: dict[Site, SparseAutoencoder] = {}
    for site, (sae, log) in train_saes(lm, tokens, part, config.sae).items():
        sae.metadata.update({"recipe": recipe_id, "final_fvu": log.fvu[-1]})
        save_saelens(sae, layout.sae_dir(site.slug))
        write_json(layout.train_log(site.slug), asdict(log))
        trained[site] = sae
    return trained


def group_claim(part: Sequence[Site]) -> str:
    """The claim on training the SAEs at `part` (a hash: a group may name many sites)."""
    slugs = ",".join(site.slug for site in part)
    return f"sae-{hashlib.sha256(slugs.encode()).hexdigest()[:16]}"


def groups_on_ray(execution: Execution) -> GroupTrainer:
    """Each group of SAEs trained on a Ray worker (see `_train_on_ray`)."""
    return partial(_train_on_ray, execution)


def _train_on_ray(
    execution: Execution,
    lm: LoadedModel,
    contexts: Contexts,
    groups: list[list[Site]],
    config: AnalyzeConfig,
    layout: RunLayout,
    recipe_id: str,
) -> dict[Site, SparseAutoencoder]:
    """The groups on Ray workers, each of which loads the model once (the training
    contexts come from here: no worker builds the corpus again) and saves what it trains as
    `train_here` does; the SAEs are then read back here (as a resumed run reads them)."""
    setup = partial(_group_worker, config, contexts, layout, recipe_id, groups, execution.wait)

    def name(index: int) -> str:
        return f"SAE group {index} ({', '.join(map(str, groups[index]))})"

    run_on_ray(range(len(groups)), setup, _group_on_worker, execution, device=config.device,
               name=name)  # fmt: skip
    sites = [site for part in groups for site in part]
    found = _found_saes(sites, recipe_id, layout, config.device)
    if lost := [str(site) for site in sites if site not in found]:
        raise CoactError(f"the Ray workers left no trained SAE at {', '.join(lost)}")
    return {site: found[site] for site in sites}


@dataclass(frozen=True)
class GroupWorker:
    """A Ray worker's model and training contexts, and the groups it may be handed."""

    config: AnalyzeConfig
    lm: LoadedModel
    tokens: Any
    layout: RunLayout
    recipe_id: str
    groups: list[list[Site]]
    wait: bool


def _group_worker(
    config: AnalyzeConfig,
    contexts: Contexts,
    layout: RunLayout,
    recipe_id: str,
    groups: list[list[Site]],
    wait: bool,
) -> GroupWorker:
    """Loaded once per worker; stops when the worker's model is not the driver's."""
    lm = run_model(config)
    if sae_recipe(lm, contexts, config) != recipe_id:
        raise CoactError("a Ray worker loaded another model than the run's driver")
    return GroupWorker(config, lm, contexts.tokens, layout, recipe_id, groups, wait)


def _group_on_worker(worker: GroupWorker, index: int) -> list[str]:
    """Group `index` under its claim (the sites it trained): none when another writer
    saved all of them meanwhile."""
    part, layout = worker.groups[index], worker.layout
    what = f"the SAEs at {', '.join(map(str, part))} of {layout.run_dir}"
    with claimed(layout.claims, group_claim(part), what, wait=worker.wait):
        if len(_found_saes(part, worker.recipe_id, layout, "cpu")) == len(part):
            return []
        train_group(worker.lm, worker.tokens, part, worker.config, layout, worker.recipe_id)
    return [str(site) for site in part]
