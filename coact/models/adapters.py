"""Architecture adapters: the only place that knows module paths.

Each adapter says, for a site, which module to read and whether its input or its output
holds the activation, and in which order sites run inside a forward pass (nnsight must
read modules in execution order). Residual sites are read as the input of the norm that
consumes them, because norms always receive the stream as their first positional argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor, nn

from coact.errors import CoactError
from coact.models.sites import SITE_KINDS, Site

Port = Literal["input", "output"]


# Rank of each kind inside a block's forward pass.
_ORDER = {"resid_pre": 0, "attn_out": 1, "resid_mid": 2, "mlp_in": 3, "mlp_out": 4}


@dataclass(frozen=True)
class ModulePoint:
    """Where a site's activation lives: `port` of the module at `path`, element `index`."""

    path: str
    port: Port
    index: int | None = None


@dataclass(frozen=True)
class Adapter:
    """Module paths of one architecture family."""

    family: str
    layers: str  # path of the ModuleList of blocks
    attn: str
    mlp: str
    attn_norm: str  # norm in front of attention; its input is resid_pre
    mlp_norm: str  # norm in front of the MLP; its input is what the MLP reads
    final_norm: str
    embed_out: str  # module whose output is resid_pre[0]
    parallel: bool
    n_layers: int
    d_model: int

    def block(self, layer: int) -> str:
        return f"{self.layers}.{layer}"

    def check(self, site: Site) -> None:
        if site.kind == "resid_mid" and self.parallel:
            raise CoactError(
                f"{site} does not exist in {self.family} with parallel residual: attention and "
                "MLP both read resid_pre; use resid_pre or mlp_resid"
            )
        top = self.n_layers if site.kind == "resid_pre" else self.n_layers - 1
        if not 0 <= site.layer <= top:
            raise CoactError(
                f"layer {site.layer} is out of range for {site}: the model has "
                f"{self.n_layers} layers (0..{self.n_layers - 1})"
            )

    def mlp_resid_kind(self) -> str:
        """The residual stream the MLP reads: resid_pre if parallel, else resid_mid."""
        return "resid_pre" if self.parallel else "resid_mid"

    def point(self, site: Site) -> ModulePoint:
        """The module, port and tuple index holding `site`."""
        self.check(site)
        kind = site.kind
        if kind == "mlp_resid":
            kind = self.mlp_resid_kind()  # type: ignore[assignment]
        block = self.block(site.layer)
        if kind == "resid_pre":
            if site.layer == self.n_layers:
                return ModulePoint(self.final_norm, "input")
            return ModulePoint(f"{block}.{self.attn_norm}", "input")
        if kind == "attn_out":
            return ModulePoint(f"{block}.{self.attn}", "output", 0)
        if kind == "resid_mid":
            return ModulePoint(f"{block}.{self.mlp_norm}", "input")
        if kind == "mlp_in":
            return ModulePoint(f"{block}.{self.mlp}", "input")
        return ModulePoint(f"{block}.{self.mlp}", "output")

    def mlp_input_point(self, layer: int) -> ModulePoint:
        """The stream the MLP of `layer` reads, as its norm's input: editing it there changes
        what the MLP sees and nothing else (the residual stream carries on untouched)."""
        self.check(Site("mlp_out", layer))
        return ModulePoint(f"{self.block(layer)}.{self.mlp_norm}", "input")

    def mlp_path(self, layer: int) -> str:
        self.check(Site("mlp_out", layer))
        return f"{self.block(layer)}.{self.mlp}"

    def attn_path(self, layer: int) -> str:
        self.check(Site("attn_out", layer))
        return f"{self.block(layer)}.{self.attn}"

    def attn_norm_path(self, layer: int) -> str:
        """The norm in front of attention (its input is resid_pre)."""
        self.check(Site("attn_out", layer))
        return f"{self.block(layer)}.{self.attn_norm}"

    def self_only_attention(self, model: nn.Module, layer: int, resid_pre: Tensor) -> Tensor:
        """attn_out[layer] if every position attended only to itself, from resid_pre[layer]
        (batch, seq, d_model): with softmax weight 1 on the token, each head returns its own
        value, so W_o·concat_h(W_v·norm(x) + b_v) + b_o (rotary never touches values). A causal
        check of whether an attention output needs other positions at all."""
        if self.family not in {"llama", "mistral", "qwen2", "gpt_neox", "gpt2"}:
            raise CoactError(f"self-only attention is not implemented for family {self.family!r}")
        attn = resolve(model, self.attn_path(layer))
        weights = next(model.parameters()).dtype  # a bfloat16 model reads bfloat16
        x = resolve(model, self.attn_norm_path(layer))(resid_pre.to(weights))
        return self._own_values(model, attn, x).float()

    def _own_values(self, model: nn.Module, attn: Any, x: Tensor) -> Tensor:
        config: Any = model.config
        n_heads = int(config.num_attention_heads)
        if self.family == "gpt_neox":  # fused output is per head [q_h | k_h | v_h]
            values = attn.query_key_value(x).unflatten(-1, (n_heads, -1)).chunk(3, dim=-1)[2]
            return attn.dense(values.flatten(-2))
        if self.family == "gpt2":  # c_attn (Conv1D) is [q | k | v], each d_model wide
            return attn.c_proj(attn.c_attn(x).chunk(3, dim=-1)[2])
        # Grouped-query attention: query head h reads kv head h // group (repeat_kv).
        values = attn.v_proj(x).unflatten(-1, (-1, attn.o_proj.in_features // n_heads))
        values = values.repeat_interleave(n_heads // values.shape[-2], dim=-2)
        return attn.o_proj(values.flatten(-2))

    def attend(
        self, model: nn.Module, layer: int, stream: Tensor, mask: Tensor, positions: Tensor
    ) -> Tensor:
        """attn_out[layer] of `stream` (batch, seq, d_model, as resid_pre) through the model's
        own norm and attention module, with an additive `mask` (batch, 1, seq, seq) in place
        of the causal one and each row's position id (`positions`, batch × seq): a sequence
        may then hold a position twice (coact.jacobian.attention_map)."""
        if self.family not in {"llama", "mistral", "qwen2", "gpt_neox", "gpt2"}:
            raise CoactError(f"attention with a mask is not implemented for {self.family!r}")
        x = resolve(model, self.attn_norm_path(layer))(stream)
        attn = resolve(model, self.attn_path(layer))
        if self.family == "gpt2":  # learned positions were added before the block
            return attn(x, attention_mask=mask)[0]
        rotary = resolve(
            model, "gpt_neox.rotary_emb" if self.family == "gpt_neox" else "model.rotary_emb"
        )
        return attn(x, attention_mask=mask, position_embeddings=rotary(x, positions))[0]

    def order_key(self, site: Site) -> tuple[int, int]:
        """Sort key that puts sites in execution order."""
        kind = self.mlp_resid_kind() if site.kind == "mlp_resid" else site.kind
        return (site.layer, _ORDER[kind])

    def last_block(self, sites: list[Site]) -> int:
        """The last block a trace must run to read all `sites`."""
        return max(s.layer for s in sites)


def resolve(root: nn.Module, path: str) -> Any:
    """Follow a dotted path (numbers index ModuleLists) from `root`, nnsight envoy or module."""
    node: Any = root
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def adapter_for(model: nn.Module) -> Adapter:
    """Pick the adapter from the model's config; unknown families are a clear error."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if config is None or model_type is None:
        raise CoactError("model has no Hugging Face config; cannot tell its architecture")
    n_layers, d_model = config.num_hidden_layers, config.hidden_size
    if model_type == "gpt_neox":
        return Adapter(
            "gpt_neox",
            "gpt_neox.layers",
            "attention",
            "mlp",
            "input_layernorm",
            "post_attention_layernorm",
            "gpt_neox.final_layer_norm",
            "gpt_neox.emb_dropout",
            bool(getattr(config, "use_parallel_residual", True)),
            n_layers,
            d_model,
        )
    if model_type in {"llama", "mistral", "qwen2"}:
        return Adapter(
            model_type,
            "model.layers",
            "self_attn",
            "mlp",
            "input_layernorm",
            "post_attention_layernorm",
            "model.norm",
            "model.embed_tokens",
            False,
            n_layers,
            d_model,
        )
    if model_type == "gpt2":
        return Adapter(
            "gpt2",
            "transformer.h",
            "attn",
            "mlp",
            "ln_1",
            "ln_2",
            "transformer.ln_f",
            "transformer.drop",
            False,
            config.n_layer,
            config.n_embd,
        )
    raise CoactError(
        f"unsupported model family {model_type!r}; supported: gpt_neox (Pythia), llama "
        "(SmolLM2, Mistral, Qwen2), gpt2"
    )


__all__ = ["SITE_KINDS", "Adapter", "ModulePoint", "adapter_for", "resolve"]
