"""The stages of one layer as records: name, the stages whose results it reads, its
settings, where it writes, how it runs and what it returns. `coact.pipeline.run` runs the
ones a config names, in this order; nothing else knows the list."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from operator import attrgetter
from typing import Any

from torch import Tensor

from coact.block.attention_causal import AttentionCausalResult, attention_causal
from coact.block.composition import CompositionSites, compose
from coact.block.decoded import decoded
from coact.block.positions import PositionsResult, positions
from coact.block.stage import ComposedBlock, attention_linearity
from coact.calibrate.stage import CalibrateResult, calibrate
from coact.connectors.stage import ConnectResult, connect
from coact.errors import CoactError
from coact.evidence.ablation import AblationResult, ablate
from coact.evidence.outliers import OutliersResult, outliers
from coact.jacobian.stage import JacobianResult, jacobian
from coact.linearity.table import LinearityConfig
from coact.logic.stage import LogicResult, label_run
from coact.models.load import LoadedModel
from coact.models.sites import Site, SitePair
from coact.pipeline.config import AnalyzeConfig
from coact.pipeline.shared import Shared, calibration_tokens, layer_sites, run_contexts
from coact.rundir.layout import RunLayout
from coact.rundir.results import Result
from coact.transcoder.stage import Labelling, TranscoderResult, transcoder_sheet


@dataclass
class LayerRun:
    """What a layer's stages share: the run's config, the model, the shared SAEs and codes,
    where the layer's results go, and the results of the stages run so far."""

    config: AnalyzeConfig
    lm: LoadedModel
    shared: Shared
    layout: RunLayout
    results: dict[str, Result] = field(default_factory=dict)

    @property
    def layer(self) -> int:
        return self.config.layer

    def decode(self, ids: list[int]) -> str:
        return str(self.lm.tokenizer.decode(ids))

    @cached_property
    def eval_tokens(self) -> Tensor:
        """The contexts the connectors held out: calibration and the block's checks run
        on them, never on tokens a connector was fitted on."""
        return calibration_tokens(self.shared.code_part, self.shared.store, self.config.connect)

    def result(self, stage: str) -> Any:
        return self.results.get(stage)

    def mlp_linearity(self) -> LinearityConfig:
        """The MLP's calibrated τ in its form, else the connect stage's (the seed's) τ."""
        base = self.config.connect.linearity
        calibrated: CalibrateResult | None = self.result("calibrate")
        if calibrated is None:
            return base
        return dataclasses.replace(base, tau=calibrated.tau, form=calibrated.form)

    def attention_linearity(self) -> LinearityConfig:
        return attention_linearity(self.mlp_linearity(), self.result("attention_calibrate"))


@dataclass(frozen=True)
class Stage:
    """One stage of a layer: `needs` names the stages whose results it reads; `settings`
    is the field of the run's config that holds its settings and `outputs` the field of the
    run's layout that names its files (dotted paths, e.g. "block.positions")."""

    name: str
    needs: tuple[str, ...]
    settings: str
    outputs: str
    run: Callable[[LayerRun, Any], Result]  # (the layer, its settings) → its result
    result: type[Result]

    def __call__(self, run: LayerRun) -> Result:
        return self.run(run, attrgetter(self.settings)(run.config))

    def files(self, layout: RunLayout) -> Any:
        """Where it writes (a `coact.rundir.layout` StageFiles)."""
        return attrgetter(self.outputs)(layout)


def _connect(run: LayerRun, settings: Any) -> Result:
    pair, files = SitePair.mlp(run.layer), run.layout.connect
    return connect(run.shared.store, pair, files.path, settings, decode=run.decode)


def _calibrate(run: LayerRun, settings: Any) -> Result:
    pair = SitePair.mlp(run.layer)
    saes = run.shared.saes
    return calibrate(
        run.lm, pair, saes[pair.in_site], saes[pair.out_site], run.eval_tokens,
        run.layout.connect.path, run.layout.calibrate.path, settings,
    )  # fmt: skip


def _jacobian(run: LayerRun, settings: Any) -> Result:
    pair, saes = SitePair.mlp(run.layer), run.shared.saes
    causal = run.layout.calibrate.causal if run.config.runs("calibrate") else None
    if causal is None and run.layout.causal.causal.is_file():  # a control's own causal check
        causal = run.layout.causal.causal
    return jacobian(
        run.lm, pair, saes[pair.in_site], saes[pair.out_site], run.eval_tokens,
        run.layout.jacobian.path, settings, causal=causal,
        causal_contexts=run.config.calibrate.contexts,
    )  # fmt: skip


def _logic(run: LayerRun, settings: Any) -> Result:
    pair, layout = SitePair.mlp(run.layer), run.layout
    return label_run(
        run.shared.store, pair, layout.connect.path, layout.logic.path, settings,
        jacobian_dir=layout.jacobian.path,
    )  # fmt: skip


def _attention(run: LayerRun, settings: Any) -> Result:
    pair, files = SitePair.attention(run.layer), run.layout.attention_connect
    return connect(run.shared.store, pair, files.path, settings, decode=run.decode)


def _attention_calibrate(run: LayerRun, settings: Any) -> Result:
    pair, saes = SitePair.attention(run.layer), run.shared.saes
    return calibrate(
        run.lm, pair, saes[pair.in_site], saes[pair.out_site], run.eval_tokens,
        run.layout.attention_connect.path, run.layout.attention_calibrate.path, settings,
    )  # fmt: skip


def _positions(run: LayerRun, settings: Any) -> Result:
    at_tau = dataclasses.replace(settings, linearity=run.attention_linearity())
    pair = SitePair.attention(run.layer)
    return positions(run.shared.store, pair, run.layout.positions.path, at_tau)


def _attention_causal(run: LayerRun, settings: Any) -> Result:
    sae_out = run.shared.saes[Site("attn_out", run.layer)]
    return attention_causal(
        run.lm, sae_out, run.eval_tokens, run.layer, run.layout.attention_causal.path,
        settings, positions_table=run.layout.positions.positions,
    )  # fmt: skip


def _attention_jacobian(run: LayerRun, settings: Any) -> Result:
    """The jacobian stage on attention's pair, with the MLP's settings (attention has no
    causal check, so no three-way agreement)."""
    pair, saes = SitePair.attention(run.layer), run.shared.saes
    return jacobian(
        run.lm, pair, saes[pair.in_site], saes[pair.out_site], run.eval_tokens,
        run.layout.attention_jacobian.path, settings,
    )  # fmt: skip


def _composition(run: LayerRun, settings: Any) -> Result:
    sites = CompositionSites.of_layer(run.layer)
    files, checks = run.layout.composition, run.config.block.decoded
    composed = compose(run.shared.store, sites, files.path, settings)
    fvu = decoded(run.lm, run.shared.saes, run.eval_tokens, files.path, run.layer, checks)
    return ComposedBlock(composition=composed, decoded_fvu=fvu)


def _outliers(run: LayerRun, settings: Any) -> Result:
    saes = {site.slug: run.shared.saes[site] for site in layer_sites(run.config, run.layer)}
    return outliers(
        run.shared.store, run.layout.outliers.path, settings, sites=list(saes),
        decode=run.decode, saes=saes,
    )  # fmt: skip


def _ablate(run: LayerRun, settings: Any) -> Result:
    from coact.pipeline.commands import report_ablation_targets

    wanted = report_ablation_targets(run.layout.run_dir, run.config.report_features, settings)
    return ablate(
        run.lm, run.shared.saes, run.shared.store, wanted, run.layout.ablation.path, settings,
        tokens=run.shared.code_part.tokens, decode=run.decode,
    )  # fmt: skip


def _transcoder(run: LayerRun, settings: Any) -> Result:
    pair, saes, layout = SitePair.mlp(run.layer), run.shared.saes, run.layout
    untrained = dataclasses.replace(run.config, sae_in=None, sae_out=None)
    train_part, _ = run_contexts(untrained, run.lm)  # the SAEs' training contexts
    logic = run.result("logic")
    labelling = None  # the transcoder's latents labelled as the logic stage labels features
    if run.config.runs("logic"):
        labelling = Labelling(run.shared.store, run.shared.code_part.tokens, run.config.logic.logic)
    return transcoder_sheet(
        run.lm, run.layer, saes[pair.in_site], saes[pair.out_site], train_part.tokens,
        run.eval_tokens, layout.connect.path, layout.transcoder.path, run.config.sae, settings,
        causal=layout.calibrate.causal if run.config.runs("calibrate") else None,
        causal_contexts=run.config.calibrate.contexts,
        labels=logic.counts if logic is not None else None,
        sae_coverage=logic.coverage if logic is not None else None, labelling=labelling,
    )  # fmt: skip


STAGES: tuple[Stage, ...] = (
    Stage("connect", (), "connect", "connect", _connect, ConnectResult),
    Stage("calibrate", ("connect",), "calibrate", "calibrate", _calibrate, CalibrateResult),
    Stage("jacobian", (), "jacobian", "jacobian", _jacobian, JacobianResult),
    Stage("logic", ("connect",), "logic", "logic", _logic, LogicResult),
    Stage("attention", (), "attention_connect", "attention_connect", _attention, ConnectResult),
    Stage(
        "attention_calibrate", ("attention",), "calibrate", "attention_calibrate",
        _attention_calibrate, CalibrateResult,
    ),
    Stage("positions", (), "block.positions", "positions", _positions, PositionsResult),
    Stage(
        "attention_causal", (), "block.causal", "attention_causal", _attention_causal,
        AttentionCausalResult,
    ),
    Stage(
        "attention_jacobian", (), "jacobian", "attention_jacobian", _attention_jacobian,
        JacobianResult,
    ),
    Stage("composition", (), "block.composition", "composition", _composition, ComposedBlock),
    Stage("outliers", (), "outliers", "outliers", _outliers, OutliersResult),
    Stage("ablate", ("connect",), "ablation", "ablation", _ablate, AblationResult),
    Stage(
        "transcoder", ("connect",), "transcoder", "transcoder", _transcoder, TranscoderResult
    ),
)  # fmt: skip


def stages_of(config: AnalyzeConfig) -> list[Stage]:
    """The stages `config` names, in data-flow order; one clear error when a stage is asked
    for without one whose results it reads."""
    chosen = [stage for stage in STAGES if config.runs(stage.name)]
    for stage in chosen:
        if missing := [n for n in stage.needs if not config.runs(n)]:
            raise CoactError(
                f"stage {stage.name} reads the results of {', '.join(missing)}: "
                "add it to the stages or leave this one out"
            )
    return chosen


__all__ = ["STAGES", "LayerRun", "Stage", "stages_of"]
