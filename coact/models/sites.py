"""Site names: where in a block an activation is read, independent of any architecture."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from coact.errors import CoactError

SiteKind = Literal["resid_pre", "attn_out", "resid_mid", "mlp_in", "mlp_out", "mlp_resid"]
SITE_KINDS: tuple[SiteKind, ...] = (
    "resid_pre",
    "attn_out",
    "resid_mid",
    "mlp_resid",
    "mlp_in",
    "mlp_out",
)

# TransformerLens hook names, as SAELens files record them, mapped to our kinds.
_TL_HOOKS = {
    "hook_resid_pre": "resid_pre",
    "hook_attn_out": "attn_out",
    "hook_resid_mid": "resid_mid",
    "hook_mlp_out": "mlp_out",
    "ln2.hook_normalized": "mlp_in",
}
_SITE_RE = re.compile(r"^\s*([a-z_]+)\s*(?:\[\s*(\d+)\s*\]|\.(\d+))\s*$")
_TL_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


@dataclass(frozen=True, order=True)
class Site:
    """A named activation of block `layer`, e.g. ``mlp_out[3]``."""

    kind: SiteKind
    layer: int

    def __str__(self) -> str:
        return f"{self.kind}[{self.layer}]"

    @property
    def slug(self) -> str:
        """A file-name friendly form, e.g. ``mlp_out.3``."""
        return f"{self.kind}.{self.layer}"

    @classmethod
    def parse(cls, text: str) -> Site:
        """Accept ``mlp_out[3]``, ``mlp_out.3`` or a TransformerLens hook name."""
        match = _SITE_RE.match(text)
        if match:
            kind, layer = match.group(1), int(match.group(2) or match.group(3))
            if kind not in SITE_KINDS:
                raise CoactError(
                    f"unknown site kind {kind!r} in {text!r}; known: {', '.join(SITE_KINDS)}"
                )
            return cls(kind, layer)
        tl = _TL_RE.match(text.strip())
        if tl:
            layer, hook = int(tl.group(1)), tl.group(2)
            if hook == "hook_resid_post":
                return cls("resid_pre", layer + 1)
            if hook in _TL_HOOKS:
                return cls(_TL_HOOKS[hook], layer)  # type: ignore[arg-type]
        raise CoactError(
            f"cannot read site {text!r}; write it as KIND[LAYER] with KIND one of "
            f"{', '.join(SITE_KINDS)}"
        )


@dataclass(frozen=True)
class SitePair:
    """What a stage connects: the site whose features are read (`in_site`) and the site
    whose features are predicted from them (`out_site`), e.g. ``mlp_resid[3] → mlp_out[3]``."""

    in_site: Site
    out_site: Site

    def __str__(self) -> str:
        return f"{self.in_site} → {self.out_site}"

    @classmethod
    def of(cls, in_site: str | Site, out_site: str | Site) -> SitePair:
        """A pair from sites or their names (``"mlp_resid[3]"``, ``"mlp_out.3"``)."""
        return cls(_site(in_site), _site(out_site))

    @classmethod
    def mlp(cls, layer: int) -> SitePair:
        """The MLP of block `layer`: the residual stream it reads → its output."""
        return cls(Site("mlp_resid", layer), Site("mlp_out", layer))

    @classmethod
    def attention(cls, layer: int) -> SitePair:
        """Attention of block `layer`: the block's input stream → attention's output."""
        return cls(Site("resid_pre", layer), Site("attn_out", layer))

    @property
    def slugs(self) -> tuple[str, str]:
        return self.in_site.slug, self.out_site.slug


def _site(site: str | Site) -> Site:
    return site if isinstance(site, Site) else Site.parse(site)
