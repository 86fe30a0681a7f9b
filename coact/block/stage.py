"""The block's other connections besides the MLP: attention and the skip path.

For block ℓ, from the same code store the MLP stages read, six stages (each its own
entry in `coact.pipeline.stages`, each reusing its finished result):

    attention            attn_out[ℓ] features from resid_pre[ℓ] features at the same
                         position: the connectors and the linearity table
                         (`coact.connectors.stage.connect`), in attention/connect/
    attention_calibrate  attention's own τ: noise and splices at attn_out[ℓ]
                         (`coact.calibrate.stage.calibrate`), in attention/calibrate/
    positions            per attention feature, how much earlier positions add over the
                         same-position fit (`coact.block.positions`), attention/positions/
    attention_causal     the position score's causal counterpart: what self-only attention
                         and resampled earlier tokens change (`coact.block.attention_causal`)
    attention_jacobian   attention's own Jacobian at the same position, the jacobian stage
                         on resid_pre[ℓ] → attn_out[ℓ] (`coact.jacobian`), attention/jacobian/
    composition          resid_pre[ℓ+1] features from resid_pre[ℓ], attn_out[ℓ] and
                         mlp_out[ℓ] features (`coact.block.composition`), and the decoded
                         check on raw activations (`coact.block.decoded`)

`block.json` is their headline (`BlockResult`). The attention connectors are fitted at the
run's connect τ (the seed's, as the MLP's are) and read at attention's calibrated τ, in the
same form; so are the position scores. A τ is a tolerance on one site's error, and sites
differ in how much error the loss notices, so each site gets its own. Without attention
calibration the MLP's τ is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from coact.block.attention_causal import AttentionCausalConfig, AttentionCausalResult
from coact.block.composition import CompositionConfig, CompositionResult
from coact.block.decoded import DecodedConfig
from coact.block.position_fits import PositionsConfig
from coact.block.positions import PositionsResult
from coact.calibrate.stage import CalibrateResult
from coact.connectors.config import ConnectConfig
from coact.connectors.stage import ConnectResult
from coact.jacobian.stage import JacobianResult
from coact.linearity.table import Form, LinearityConfig, LinearShare
from coact.models.sites import Site
from coact.rundir.results import Result


@dataclass(frozen=True)
class BlockConfig:
    """Settings of the block's stages (which of them run is the run's `stages`)."""

    # None: the run's own connect settings (the MLP's), so both are fitted alike
    attention_connect: ConnectConfig | None = None
    positions: PositionsConfig = field(default_factory=PositionsConfig)
    composition: CompositionConfig = field(default_factory=CompositionConfig)
    causal: AttentionCausalConfig = field(default_factory=AttentionCausalConfig)
    decoded: DecodedConfig = field(default_factory=DecodedConfig)


@dataclass(frozen=True, kw_only=True)
class BlockResult(Result):
    """The block stages' headline: attention's τ and linear share at it, the position
    score, its causal counterpart and the composition of the next stream."""

    layer: int
    tau: float  # the τ attention is read at: its own calibrated one, else the MLP's
    form: Form
    mlp_tau: float
    attention: ConnectResult | None = None  # as fitted, at the connect τ
    attention_share: LinearShare | None = None  # at `tau`
    attention_calibration: CalibrateResult | None = None
    positions: PositionsResult | None = None
    attention_causal: AttentionCausalResult | None = None
    attention_jacobian: JacobianResult | None = None  # attention's own Jacobian (same position)
    composition: CompositionResult | None = None
    decoded_fvu: dict[str, float] | None = None  # per check of `coact.block.decoded`


@dataclass(frozen=True, kw_only=True)
class ComposedBlock(Result):
    """The composition stage's result: the fit, and the decoded check's FVU per check
    (recomputed each run: it is a few forward passes)."""

    composition: CompositionResult
    decoded_fvu: dict[str, float]


def block_sites(layer: int) -> dict[str, Site]:
    """The roles of a block's sites: what attention reads and writes, what the MLP reads and
    writes, and the next residual stream. For parallel-residual models mlp_resid[ℓ] is the
    same activation as resid_pre[ℓ]; the pipeline gives both names one SAE."""
    return {
        "attn_in": Site("resid_pre", layer),
        "attn_out": Site("attn_out", layer),
        "mlp_in": Site("mlp_resid", layer),
        "mlp_out": Site("mlp_out", layer),
        "next": Site("resid_pre", layer + 1),
    }


def attention_linearity(
    mlp: LinearityConfig, attention_calibration: CalibrateResult | None
) -> LinearityConfig:
    """The τ attention is read at: its own calibrated τ (in its form), else the MLP's."""
    if attention_calibration is None:
        return mlp
    return replace(mlp, tau=attention_calibration.tau, form=attention_calibration.form)
