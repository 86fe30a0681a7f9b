"""Checks a run passes before it touches its run directory, and the guards that keep a
failed run from leaving anything fresh behind: the run directory itself (a file? writable?),
the settings against the loaded model (context length, k against the SAE's width), a given
SAE's recorded model, and the SAEs' evaluations (NaN or negative FVE stops the run)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from coact.errors import CoactError
from coact.models.load import LoadedModel
from coact.models.sites import Site
from coact.pipeline.config import AnalyzeConfig
from coact.pipeline.shared import Shared, layer_sites
from coact.rundir.layout import RunLayout
from coact.sae.base import SparseAutoencoder
from coact.sae.evaluate import SaeReport, check_sae_fits

MODEL_KEYS = ("model_name", "model", "base_model")  # where SAE formats record their model


def check_run_dir(run_dir: Path) -> None:
    """One line when the run directory cannot hold a run: a file stands there, or it (or
    the nearest folder that exists above it) cannot be written."""
    if run_dir.exists() and not run_dir.is_dir():
        raise CoactError(f"{run_dir} is a file, not a run directory; choose another --run-dir")
    probe = run_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        handle, name = tempfile.mkstemp(prefix=".coact-probe.", dir=probe)
    except OSError as error:
        raise CoactError(
            f"cannot write in {probe} ({error.strerror or error}); make it writable or "
            "choose another --run-dir"
        ) from None
    os.close(handle)
    os.unlink(name)


def positions_of(lm: LoadedModel) -> int | None:
    """The most positions the model embeds (None when its config does not say)."""
    config = lm.model.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_against_model(config: AnalyzeConfig, lm: LoadedModel) -> None:
    """Settings that only the loaded model can judge: the layer is one of its blocks, the
    context fits its positions, and a trained SAE's k fits its width (expansion × d_model)."""
    n_layers = lm.adapter.n_layers
    if config.layers is None and not 0 <= config.layer < n_layers:
        raise CoactError(
            f"layer {config.layer} is out of range: the model has {n_layers} layers "
            f"(0..{n_layers - 1})"
        )
    most = positions_of(lm)
    if most is not None and config.ctx_len > most:
        raise CoactError(
            f"--ctx-len {config.ctx_len} is longer than {lm.name}'s {most} positions; "
            f"use at most {most}"
        )
    width = config.sae.expansion * lm.adapter.d_model
    training = config.layers is not None or config.sae_in is None or config.sae_out is None
    if training and config.sae.k > width:
        raise CoactError(
            f"--k {config.sae.k} is above the SAE's width {width} (expansion "
            f"{config.sae.expansion} × d_model {lm.adapter.d_model}); use at most {width}"
        )


def recorded_model(sae: SparseAutoencoder) -> str | None:
    """The model an SAE's files say it was trained on (None when they do not say)."""
    for key in MODEL_KEYS:
        value = sae.metadata.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def same_model(recorded: str, name: str) -> bool:
    """Hub ids and local names compare by their last part, case aside
    ("EleutherAI/pythia-70m-deduped" is "pythia-70m-deduped")."""

    def tail(text: str) -> str:
        return text.strip("/").split("/")[-1].lower()

    return tail(recorded) == tail(name)


def pairing_problems(
    saes: Mapping[Site, SparseAutoencoder], lm: LoadedModel, given: Mapping[Site, str | None]
) -> list[str]:
    """Why a given SAE does not belong to this model, one line each (its site and width are
    checked where it is loaded, `sae.evaluate.check_sae_fits`)."""
    problems = []
    for site, sae in saes.items():
        recorded = recorded_model(sae)
        if recorded is not None and not same_model(recorded, lm.name):
            source = given.get(site) or "the SAE"
            problems.append(f"{source} was trained on {recorded}, not {lm.name} (at {site})")
    return problems


def fit_problems(reports: Mapping[Site, SaeReport]) -> list[str]:
    """SAEs whose evaluation shows they do not reconstruct their site: NaN or negative FVE
    (worse than predicting the mean), each with its figures."""
    return [
        f"the SAE at {site} explains FVE {report.fve:.3g} of its activations (L0 "
        f"{report.l0:.3g}, on {report.n_tokens} tokens): worse than their mean"
        for site, report in reports.items()
        if not report.fve >= 0  # NaN too
    ]


def stop_or_warn(problems: list[str], allow_mismatch: bool) -> list[str]:
    """Stop on the first problem, unless `--allow-mismatch`: then they are warnings."""
    if problems and not allow_mismatch:
        raise CoactError(
            f"{problems[0]}; use SAEs trained on this model and site, or pass --allow-mismatch"
        )
    return [f"proceeded with --allow-mismatch: {p}" for p in problems]


def before_touching(
    config: AnalyzeConfig, lm: LoadedModel, run_dir: Path, given: Mapping[Site, str | None]
) -> None:
    """Everything a run can check before it writes: the run directory, the settings against
    the model, and a given SAE's site, width and recorded model (loaded here, then again by
    the run); a wrong model stops here unless `--allow-mismatch` (`layer_warnings` then
    records it)."""
    from coact.sae.formats import load_sae

    check_run_dir(run_dir)
    check_against_model(config, lm)
    saes = {site: load_sae(source) for site, source in given.items() if source is not None}
    for site, sae in saes.items():
        lm.adapter.check(site)
        check_sae_fits(sae, site, lm.adapter.d_model, lm.adapter.mlp_resid_kind())
    stop_or_warn(pairing_problems(saes, lm, given), config.allow_mismatch)


def layer_warnings(
    config: AnalyzeConfig, lm: LoadedModel, shared: Shared, say: bool = True
) -> list[str]:
    """After the SAEs' evaluation, for the layer's sites: stop on a given SAE recorded as
    another model's, or an SAE with NaN or negative FVE (naming its figures); with
    `--allow-mismatch` they are returned as warnings (summary.json's `warnings`)."""
    here = layer_sites(config, config.layer)
    given = {site: shared.saes[site] for site in here if shared.given.get(site)}
    reports = {site: shared.reports[site] for site in here}
    problems = pairing_problems(given, lm, shared.given) + fit_problems(reports)
    warnings = stop_or_warn(problems, config.allow_mismatch)
    for warning in warnings if say else ():
        print(f"coact: warning: {warning}", file=sys.stderr)
    return warnings


@contextmanager
def config_kept_on_failure(path: Path) -> Iterator[None]:
    """A run that fails leaves config.json as it found it: the earlier bytes put back, or
    no config.json where there was none; a run directory the failed run made and left
    holding nothing but claims (lock files) is removed."""
    before = path.read_bytes() if path.is_file() else None
    fresh = not path.parent.exists()
    try:
        yield
    except Exception:  # not an interrupt: a run stopped by hand resumes from its config
        if before is None:
            path.unlink(missing_ok=True)
        elif not path.is_file() or path.read_bytes() != before:
            tmp = path.with_name(f".{path.name}.restore")
            tmp.write_bytes(before)
            os.replace(tmp, path)
        if fresh and _only_claims(path.parent):
            shutil.rmtree(path.parent, ignore_errors=True)
        raise


def _only_claims(run_dir: Path) -> bool:
    """The folder holds no file but the claims' own (`.claims/`)."""
    claims = RunLayout(run_dir, run_dir).claims.path
    files = [p for p in run_dir.rglob("*") if not p.is_dir()]
    return run_dir.is_dir() and all(claims in p.parents for p in files)


__all__ = [
    "before_touching",
    "check_against_model",
    "check_run_dir",
    "config_kept_on_failure",
    "fit_problems",
    "layer_warnings",
    "pairing_problems",
    "stop_or_warn",
]
