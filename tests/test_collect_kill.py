"""A collection killed mid-run resumes to the same bytes; `coact collect` / `train-sae` work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from coact.codes.store import CodeStore
from coact.errors import CoactError
from coact.sae.base import Sae
from coact.sae.formats import save_saelens

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}


def _random_sae(site: str, seed: int) -> Sae:
    gen = torch.Generator().manual_seed(seed)
    sae = Sae(64, 256, activation="topk", k=8, site=site)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(64, 256, generator=gen) / 8)
        sae.W_dec.copy_(torch.randn(256, 64, generator=gen) / 8)
    return sae


def _collect(tmp_path: Path, out: Path) -> subprocess.Popen[str]:
    saes = []
    for i, site in enumerate(["mlp_resid[1]", "mlp_out[1]"]):
        path = tmp_path / f"sae{i}"
        if not path.exists():
            save_saelens(_random_sae(site, i), path)
        saes += ["--sae", f"{site}={path}"]
    command = [sys.executable, "-m", "coact", "collect", "--model", "tiny-llama",
               "--tokens", "60000", "--out", str(out), *saes]  # fmt: skip
    return subprocess.Popen(
        command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _files(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*.safetensors"))
    }


def test_killed_collection_resumes_byte_identical(tmp_path: Path) -> None:
    whole = _collect(tmp_path, tmp_path / "whole")
    assert whole.wait(timeout=300) == 0, whole.stderr.read() if whole.stderr else ""
    killed = _collect(tmp_path, tmp_path / "killed")
    manifest = tmp_path / "killed" / "manifest.json"
    deadline = time.time() + 240
    while time.time() < deadline:  # kill once at least one shard (not all) has landed
        if manifest.is_file() and json.loads(manifest.read_text())["shards"]:
            break
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    done = CodeStore.open(tmp_path / "killed").completed_shards
    total = len(CodeStore.open(tmp_path / "whole").completed_shards)
    assert 0 < len(done) < total, (done, total)
    resumed = _collect(tmp_path, tmp_path / "killed")
    assert resumed.wait(timeout=300) == 0
    assert _files(tmp_path / "killed") == _files(tmp_path / "whole")
    assert (tmp_path / "killed" / "manifest.json").read_bytes() == (
        tmp_path / "whole" / "manifest.json"
    ).read_bytes()


def test_collect_with_wrong_site_sae_is_refused(tmp_path: Path) -> None:
    from coact.api import collect

    with pytest.raises(
        CoactError, match=r"trained for site mlp_out\[2\] but is used at mlp_out\[1\]"
    ):
        saes = {"mlp_out[1]": _random_sae("mlp_out[2]", 0)}
        collect(saes, out=tmp_path / "c", model="tiny-llama", tokens=500)
    assert not (tmp_path / "c").exists()


def test_train_sae_cli_writes_a_loadable_sae(tmp_path: Path) -> None:
    from coact.sae.formats import load_sae

    out = tmp_path / "sae"
    result = subprocess.run(
        [sys.executable, "-m", "coact", "train-sae", "--site", "mlp_out[0]", "--model",
         "tiny-gpt2", "--tokens", "3000", "--k", "4", "--out", str(out)],
        env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    sae = load_sae(out)
    assert sae.site == "mlp_out[0]" and sae.width == 256 and sae.k == 4
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["hook_name"] == "blocks.0.hook_mlp_out"


@pytest.mark.parametrize("activation", ["topk", "relu"])
def test_encode_csr_equals_dense_encode(activation: str) -> None:
    from coact.codes.collect import encode_csr

    sae = _random_sae("mlp_out[1]", 3)
    sae.activation = activation  # type: ignore[assignment]
    with torch.no_grad():
        sae.b_enc.fill_(-0.3)  # some rows get fewer than k positive pre-activations
        x = torch.randn(50, 64, generator=torch.Generator().manual_seed(0))
        dense = sae.encode(x).numpy()
    matrix = encode_csr(sae, x)
    assert matrix.has_sorted_indices and (matrix.data > 0).all()
    assert (matrix.toarray() == dense).all()
