"""A skip transcoder on disk in sparsify's format, so sparsify and coact both load it.

sparsify (`SparseCoder.save_to_disk`) writes a folder named by its hookpoint
(`layers.3.mlp` for an MLP) holding `cfg.json` and `sae.safetensors`; a skip transcoder
has `transcode` and `skip_connection` true and a `W_skip`. The reading and writing is
`coact.sae.formats.sparsify`'s (`SparsifyCoder`), shared with the SAE loaders; this module
only converts to and from `SkipTranscoder`. coact's own fields ride along in cfg.json
(sparsify drops fields it does not know).
"""

from __future__ import annotations

import re
from pathlib import Path

from coact.errors import CoactError
from coact.sae.formats.sparsify import SparsifyCoder, read_sparsify, save_sparsify
from coact.transcoder.model import SkipTranscoder

_HOOKPOINT = re.compile(r"^(?:.+\.)?(?:layers|h)\.(\d+)\.mlp$")


def hookpoint(layer: int) -> str:
    """sparsify's name for the MLP of block `layer` of a Llama-style model."""
    return f"layers.{layer}.mlp"


def save_transcoder(tc: SkipTranscoder, directory: str | Path) -> Path:
    """Write cfg.json + sae.safetensors (atomically: the old folder or the new one)."""
    if tc.d_in != tc.d_out:
        raise CoactError(f"sparsify's format needs d_in == d_out, got {tc.d_in} → {tc.d_out}")
    coder = SparsifyCoder(
        encoder_weight=tc.W_enc.T,
        encoder_bias=tc.b_enc,
        W_dec=tc.W_dec,
        b_dec=tc.b_dec,
        W_skip=tc.W_skip if tc.skip else None,
        k=tc.k,
        transcode=True,
        normalize_decoder=False,
        expansion_factor=max(1, tc.width // tc.d_in),
        extra_cfg={"coact_layer": tc.layer, "coact_metadata": tc.metadata},
    )
    return save_sparsify(coder, directory)


def load_transcoder(directory: str | Path, *, device: str = "cpu") -> SkipTranscoder:
    """A sparsify transcoder folder (coact's or sparsify's own), local or
    `hf://OWNER/REPO/HOOKPOINT`, as a `SkipTranscoder`."""
    hub_id = str(directory).startswith("hf://")
    path = Path(str(directory).rstrip("/")) if hub_id else Path(directory).expanduser()
    coder = read_sparsify(str(directory) if hub_id else path)
    if not coder.transcode:
        raise CoactError(f"{path}: not a transcoder (transcode is false); load it as an SAE")
    match = _HOOKPOINT.match(path.name)
    layer = coder.extra_cfg.get("coact_layer", int(match.group(1)) if match else None)
    metadata = dict(coder.extra_cfg.get("coact_metadata") or {})
    tc = SkipTranscoder(
        coder.d_in, coder.d_in, coder.num_latents, coder.k, skip=coder.skip_connection,
        layer=layer, metadata={**metadata, "source": str(path)},
    )  # fmt: skip
    tc.W_enc.data.copy_(coder.encoder_weight.T)
    tc.b_enc.data.copy_(coder.encoder_bias)
    tc.W_dec.data.copy_(coder.W_dec)
    tc.b_dec.data.copy_(coder.b_dec)
    if coder.W_skip is not None:
        tc.W_skip.data.copy_(coder.W_skip)
    return tc.to(device).eval().requires_grad_(False)
