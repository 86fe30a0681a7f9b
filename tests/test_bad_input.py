"""Bad input, table-driven: every command given a wrong option, argument, path or a damaged
run stops with one clear message and a non-zero exit, and leaves every file as it was.

One small run directory (planted codes for tiny-llama's layer 1 and a finished connect
stage) is built once per module and copied per case; the CLI runs in-process."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from coact.codes.store import CodeStore
from coact.connectors.config import MLP_FIT, ConnectConfig
from coact.connectors.exact import LassoPathConfig
from coact.connectors.stage import connect
from coact.models.sites import Site, SitePair
from coact.rundir.files import write_json
from coact.rundir.layout import CodesFiles, RunLayout
from coact.rundir.verify import guarded, require_codes
from coact.sae.base import Sae
from coact.sae.formats import save_saelens
from tests.cli_calls import invoke
from tests.tiny_run import tiny_config

WIDTH, CONTEXTS, POSITIONS = 256, 8, 31  # tiny-llama: d_model 64, expansion 4
FAST_CONNECT = ConnectConfig(
    path=LassoPathConfig(n_alphas=3),
    mlp=dataclasses.replace(MLP_FIT, hidden=16, epochs=1),
    stability=False,
    progress=False,
)
Setup = Callable[[Path], None]


def _codes(rng: np.random.Generator) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Inputs with a planted sparse linear map to the outputs (rectified)."""
    n = CONTEXTS * POSITIONS
    x = sp.random(n, WIDTH, density=0.03, random_state=rng, format="csr", dtype=np.float32)
    x.data = np.abs(x.data) + 0.1
    w = sp.random(WIDTH, WIDTH, density=0.01, random_state=rng, format="csr", dtype=np.float32)
    y = sp.csr_matrix(x @ w)
    y.data = np.maximum(y.data, 0).astype(np.float32)
    y.eliminate_zeros()
    return x, y


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run directory every case copies, and beside it an SAE of the wrong width and one
    recorded as trained on another model."""
    root = tmp_path_factory.mktemp("bad_input")
    run = root / "run"
    config = tiny_config(run, stages=("connect",), connect=FAST_CONNECT)
    layout = RunLayout(run, run)
    run.mkdir()
    write_json(layout.config, dataclasses.asdict(config))
    sites = {"mlp_resid.1": WIDTH, "mlp_out.1": WIDTH}
    store = CodeStore.open_for_writing(layout.codes, fingerprint="planted", sites=sites)
    rng = np.random.default_rng(0)
    for shard in range(2):
        x, y = _codes(rng)
        contexts = np.repeat(np.arange(CONTEXTS) + shard * CONTEXTS, POSITIONS)
        tokens = {
            "context": contexts,
            "position": np.tile(np.arange(1, POSITIONS + 1), CONTEXTS),
            "token_id": rng.integers(0, 100, CONTEXTS * POSITIONS),
            "doc": contexts,
        }
        store.write_shard(shard, tokens, {"mlp_resid.1": x, "mlp_out.1": y})
    with guarded(layout.connect):
        connect(store, SitePair.mlp(1), layout.connect.path, config.resolved().connect)
    for site in ("mlp_resid[1]", "mlp_out[1]"):  # the run's own SAEs, as if trained
        save_saelens(
            Sae(64, WIDTH, activation="topk", k=4, site=site), layout.sae_dir(Site.parse(site).slug)
        )
    require_codes(layout.codes)  # the store's stamp, as the first verification leaves it
    save_saelens(Sae(32, 64, activation="topk", k=4, site="mlp_out[1]"), root / "narrow_sae")
    other = Sae(64, WIDTH, activation="topk", k=4, site="mlp_out[1]")
    other.metadata["model_name"] = "EleutherAI/pythia-70m-deduped"
    save_saelens(other, root / "other_sae")
    return root


def _shard(run: Path, site: str = "mlp_out.1", index: int = 0) -> Path:
    return run / "codes" / CodesFiles.shard(site, index)


def _flip(path: Path) -> None:
    """One byte changed in place: same size, new time."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def _corrupt_config(run: Path) -> None:
    (run / "config.json").write_text('{"model": "tiny-llama", ')


def _delete_shard(run: Path) -> None:
    _shard(run).unlink()


def _flip_shard(run: Path) -> None:
    _flip(_shard(run))


def _truncate_shard(run: Path) -> None:
    _truncate(_shard(run, "tokens", 1))


def _delete_manifest(run: Path) -> None:
    (run / "codes" / "manifest.json").unlink()


def _corrupt_manifest(run: Path) -> None:
    (run / "codes" / "manifest.json").write_text("{not json")


def _flip_weights(run: Path) -> None:
    _flip(run / "connect" / "weights.parquet")


def _delete_features(run: Path) -> None:
    (run / "connect" / "features.parquet").unlink()


def _truncate_features(run: Path) -> None:
    _truncate(run / "connect" / "features.parquet")


def _damage_sae(run: Path) -> None:
    path = run / "sae" / "mlp_out.1" / "sae_weights.safetensors"
    data = bytearray(path.read_bytes())
    data[3] ^= 0xFF  # the header's length: unreadable
    path.write_bytes(bytes(data))


def _flip_headline(run: Path) -> None:
    path = run / "connect" / "connect.json"
    path.write_text(path.read_text().replace('"alpha"', '"alpha" ', 1))


USAGE = [
    ([], 2, "Usage"),
    (["nosuch"], 2, "No such command 'nosuch'"),
    (["connect"], 2, "Missing argument"),
    (["connect", "{run}", "--bogus"], 2, "No such option: --bogus"),
    (["connect", "{run}", "extra"], 2, "unexpected extra argument"),
    (["analyze", "--layer", "abc"], 2, "Invalid value for '--layer'"),
    (["analyze", "--tokens", "many"], 2, "Invalid value for '--tokens'"),
    (["analyze", "--seed", "1.5"], 2, "Invalid value for '--seed'"),
    (["graph", "{run}"], 2, "Missing argument"),
    (["graph", "{run}", "mlp_out[1]", "abc"], 2, "Invalid value"),
    (["ablate", "{run}", "--feature", "x"], 2, "Invalid value for '--feature'"),
    (["calibrate", "{run}", "--causal", "yes"], 2, "unexpected extra argument"),
    (["logic", "{run}", "--max-inputs"], 2, "requires an argument"),
    (["report", "--features", "3"], 2, "Missing argument"),
    (["linearity", "{run}", "--tau", "abc"], 2, "Invalid value for '--tau'"),
    (["collect", "--out", "{missing}"], 2, "Missing option '--sae'"),
    (["train-sae", "--out", "{missing}"], 2, "Missing option '--site'"),
    (["outliers", "{run}", "--min-active", "1.5"], 2, "Invalid value for '--min-active'"),
    (["connect", "{run}", "--stability", "no"], 2, "unexpected extra argument"),
]

RANGES = [
    (["analyze", "--ctx-len", "1", "--run-dir", "{run}"], 2, "'--ctx-len': must be at least 2"),
    (["analyze", "--ctx-len", "0"], 2, "'--ctx-len': must be at least 2"),
    (["analyze", "--layer", "-1", "--run-dir", "{run}"], 2, "'--layer': must be at least 0"),
    (["analyze", "--tokens", "0", "--run-dir", "{run}"], 2, "tokens (--tokens) must be at least 1"),
    (["analyze", "--sae-tokens", "-5"], 2, "sae_tokens (--sae-tokens) must be at least 1"),
    (["analyze", "--report-features", "-1"], 2, "(--report-features) must be at least 0"),
    (["train-sae", "--site", "mlp_out[1]", "--out", "{missing}", "--k", "0"], 2, "'--k'"),
    (
        ["train-sae", "--site", "mlp_out[1]", "--out", "{missing}", "--expansion", "0"],
        2,
        "'--expansion': must be at least 1",
    ),
    (
        ["train-sae", "--site", "mlp_out[1]", "--out", "{missing}", "--tokens", "0"],
        2,
        "'--tokens': must be at least 1",
    ),
    (
        [
            "train-sae",
            "--site",
            "mlp_out[1]",
            "--out",
            "{missing}",
            "--model",
            "tiny-llama",
            "--k",
            "1000",
        ],
        2,
        "--k 1000 is above the SAE's width 256",
    ),
    (["connect", "{run}", "--n-alphas", "0"], 2, "'--n-alphas': must be at least 1, got 0"),
    (["connect", "{run}", "--n-alphas", "-3"], 2, "'--n-alphas': must be at least 1"),
    (["connect", "{run}", "--tau", "nan"], 2, "'--tau': must be a number, got nan"),
    (["connect", "{run}", "--magnitude", "-1"], 2, "'--magnitude': must be at least 0"),
    (["connect", "{run}", "--mlp-epochs", "0"], 2, "'--mlp-epochs': must be at least 1"),
    (["connect", "{run}", "--form", "bogus"], 2, "unknown form 'bogus'"),
    (["calibrate", "{run}", "--contexts", "0"], 2, "'--contexts': must be at least 1"),
    (["calibrate", "{run}", "--max-contexts", "0"], 2, "'--max-contexts': must be at least 1"),
    (["calibrate", "{run}", "--tolerance", "0"], 2, "'--tolerance': must be above 0"),
    (["calibrate", "{run}", "--tolerance", "-1"], 2, "'--tolerance': must be above 0"),
    (["calibrate", "{run}", "--form", "bogus"], 2, "unknown form 'bogus'"),
    (["logic", "{run}", "--max-inputs", "0"], 2, "--max-inputs"),
    (["logic", "{run}", "--max-inputs", "99"], 2, "--max-inputs"),
    (["ablate", "{run}", "--contexts", "0"], 2, "'--contexts': must be at least 1"),
    (["ablate", "{run}", "--window", "0"], 2, "'--window': must be at least 1"),
    (["ablate", "{run}", "--batch-size", "0"], 2, "'--batch-size': must be at least 1"),
    (["ablate", "{run}", "--inputs", "-1"], 2, "'--inputs': must be at least 0"),
    (["ablate", "{run}", "--input-contexts", "-1"], 2, "'--input-contexts': must be at least 0"),
    (["ablate", "{run}", "--features", "0"], 2, "'--features': must be at least 1"),
    (["ablate", "{run}", "--feature", "99999"], 2, "--feature 99999 is out of range"),
    (["ablate", "{run}", "--feature", "-1"], 2, "--feature -1 is out of range"),
    (["ablate", "{run}", "--mode", "sideways"], 2, "unknown --mode"),
    (["outliers", "{run}", "--share", "1.5"], 2, "'--share': must be 0 to 1"),
    (["outliers", "{run}", "--share", "-0.1"], 2, "'--share': must be 0 to 1"),
    (["outliers", "{run}", "--norm-factor", "0"], 2, "'--norm-factor': must be above 0"),
    (["outliers", "{run}", "--min-active", "0"], 2, "'--min-active': must be at least 1"),
    (["outliers", "{run}", "--first-positions", "-1"], 2, "'--first-positions'"),
    (["linearity", "{run}", "--tau", "nan"], 2, "'--tau': must be a number"),
    (["linearity", "{run}", "--tau", "0.01", "--form", "bogus"], 2, "unknown form 'bogus'"),
    (["report", "{run}", "--features", "-1"], 2, "'--features': must be at least 0"),
    (["report", "{run}", "--feature", "99999"], 2, "--feature 99999 is out of range"),
    (["graph", "{run}", "mlp_out[1]", "0", "--top", "0"], 2, "'--top': must be at least 1"),
    (["graph", "{run}", "mlp_out[1]", "0", "--depth", "0"], 2, "'--depth': must be at least 1"),
    (["analyze", "--budget", "huge", "--run-dir", "{run}"], 2, "unknown budget 'huge'"),
    (["analyze", "--layers", "abc", "--run-dir", "{run}"], 2, "cannot read layers 'abc'"),
    (["analyze", "--layers", ",", "--run-dir", "{run}"], 2, "no layers in ','"),
    (["analyze", "--dtype", "float7", "--run-dir", "{run}"], 2, "unknown dtype 'float7'"),
    (["collect", "--sae", "noequals", "--out", "{missing}"], 2, "--sae expects SITE=PATH"),
]

MODEL = ["analyze", "--model", "tiny-llama", "--layer", "1", "--run-dir"]
AGAINST_MODEL = [
    ([*MODEL, "{run}", "--ctx-len", "100000"], 2, "longer than tiny-llama's 512 positions"),
    ([*MODEL, "{missing}", "--ctx-len", "600"], 2, "--ctx-len 600 is longer"),
    ([*MODEL, "{run}", "--layer", "9"], 2, "layer 9 is out of range"),
    ([*MODEL, "{missing}", "--layer", "9"], 2, "layer 9 is out of range"),
    ([*MODEL, "{missing}", "--corpus", "./no-such-corpus.txt"], 2, "does not exist"),
    (
        ["analyze", "--model", "tiny-llama", "--budget", "huge", "--run-dir", "{missing}"],
        2,
        "unknown budget 'huge'",
    ),
    ([*MODEL, "{run}", "--corpus", "./no-such-corpus.txt"], 2, "does not exist"),
    ([*MODEL, "{missing}", "--corpus", "{empty}"], 2, "empty"),
    ([*MODEL, "{missing}", "--sae-out", "{narrow_sae}"], 2, "reads 32-dim activations"),
    ([*MODEL, "{missing}", "--sae-out", "{other_sae}"], 2, "trained on EleutherAI/pythia"),
    ([*MODEL, "{run}", "--sae-out", "{other_sae}"], 2, "pass --allow-mismatch"),
    (["analyze", "--model", "no-such-model", "--run-dir", "{missing}"], 2, "unknown model"),
]

FILES = [
    (["connect", "{file}"], 2, "is a file, not a run directory"),
    (["logic", "{file}"], 2, "is a file, not a run directory"),
    (["connect", "{missing}"], 2, "is not a run directory (no config.json)"),
    (["calibrate", "{missing}"], 2, "is not a run directory (no config.json)"),
    (["outliers", "{missing}"], 2, "is not a run directory"),
    ([*MODEL, "{file}"], 2, "is a file, not a run directory"),
]

DAMAGED: list[tuple[list[str], int, str, Setup]] = [
    (["connect", "{run}"], 2, "corrupt", _corrupt_config),
    (["logic", "{run}"], 2, "corrupt", _corrupt_config),
    (["ablate", "{run}"], 2, "corrupt", _corrupt_config),
    (["report", "{run}"], 2, "corrupt", _corrupt_config),
    (["connect", "{run}"], 2, "shard-00000.safetensors is missing", _delete_shard),
    (["logic", "{run}"], 2, "shard-00000.safetensors is missing", _delete_shard),
    (["outliers", "{run}"], 2, "shard-00000.safetensors is missing", _delete_shard),
    (["ablate", "{run}"], 2, "shard-00000.safetensors is missing", _delete_shard),
    (["connect", "{run}"], 2, "does not match its checksum", _flip_shard),
    (["logic", "{run}"], 2, "does not match its checksum", _flip_shard),
    (["outliers", "{run}"], 2, "does not match its checksum", _flip_shard),
    (["logic", "{run}"], 2, "bytes", _truncate_shard),
    (["connect", "{run}"], 2, "no feature codes", _delete_manifest),
    (["logic", "{run}"], 2, "corrupt", _corrupt_manifest),
    (["logic", "{run}"], 2, "weights.parquet changed since its stage wrote it", _flip_weights),
    (["linearity", "{run}"], 2, "weights.parquet changed since", _flip_weights),
    (["report", "{run}"], 2, "weights.parquet changed since", _flip_weights),
    (["ablate", "{run}"], 2, "weights.parquet changed since", _flip_weights),
    (["logic", "{run}"], 2, "features.parquet is missing", _delete_features),
    (["linearity", "{run}"], 2, "features.parquet is missing", _delete_features),
    (["linearity", "{run}"], 2, "features.parquet is", _truncate_features),
    (["logic", "{run}"], 2, "connect.json is", _flip_headline),
    (["outliers", "{run}"], 2, "cannot read SAE weights", _damage_sae),
    (["ablate", "{run}", "--feature", "3"], 2, "cannot read SAE weights", _damage_sae),
]

CASES = [(*case, None) for case in USAGE + RANGES + AGAINST_MODEL + FILES] + DAMAGED


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file's bytes, but the claims' lock files: a writer's claim on a stage is not a
    result (`coact.rundir.claims` keeps them, empty, between runs)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".claims" not in p.parts
    }


@pytest.mark.parametrize(("argv", "code", "fragment", "setup"), CASES)
def test_bad_input_stops_clearly_and_touches_nothing(
    built: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    code: int,
    fragment: str,
    setup: Setup | None,
) -> None:
    run = tmp_path / "run"
    shutil.copytree(built / "run", run)  # copy2: times kept, so the stamps still hold
    (tmp_path / "afile").write_text("not a run")
    (tmp_path / "empty.txt").write_text("   \n")
    if setup is not None:
        setup(run)
    places = {
        "{run}": str(run),
        "{file}": str(tmp_path / "afile"),
        "{empty}": str(tmp_path / "empty.txt"),
        "{missing}": str(tmp_path / "missing"),
        "{narrow_sae}": str(built / "narrow_sae"),
        "{other_sae}": str(built / "other_sae"),
    }
    before = _snapshot(tmp_path)
    exit_code, said = invoke([places.get(a, a) for a in argv], capsys)
    assert exit_code == code, said
    assert fragment in said, said
    assert "Traceback" not in said
    errors = [line for line in said.splitlines() if line.startswith("coact: error:")]
    assert argv == [] or len(errors) == 1, said
    assert _snapshot(tmp_path) == before
    assert not (tmp_path / "missing").exists()


def test_at_least_74_cases() -> None:
    assert len(CASES) >= 74


def test_a_stage_whose_own_files_changed_recomputes_them(
    built: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`coact connect` on a run whose connect/weights.parquet was damaged does not reuse
    it: it recomputes the stage, whose fitted tables land byte-identical to the undamaged."""
    run = tmp_path / "run"
    shutil.copytree(built / "run", run)
    whole = _snapshot(run / "connect")
    _flip_weights(run)
    same = ["--n-alphas", "3", "--mlp-epochs", "1", "--no-stability"]  # the run's settings
    code, said = invoke(["connect", str(run), *same], capsys)
    assert code == 0, said
    assert "weights.parquet changed since its stage wrote it (checksum mismatch)" in said
    assert "recomputing" in said
    again = _snapshot(run / "connect")
    fitted = ("weights.parquet", "sweep.parquet", "features.parquet")  # top_tokens: decoded now
    assert [again[name] for name in fitted] == [whole[name] for name in fitted]
    assert json.loads(again["connect.json"])["key"] == json.loads(whole["connect.json"])["key"]
