"""The `coact` command line: thin wrappers that build configs and call the stage functions."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from coact.errors import CoactError
from coact.models import EMBEDDED

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="coact: how the SAE features a transformer block reads turn into the features it writes.",
)

ModelOpt = Annotated[
    str, typer.Option(help=f"{EMBEDDED!r}, a tiny-* test model, a local directory or a hub id")
]
CorpusOpt = Annotated[
    str, typer.Option(help="'embedded', a text file or folder, a saved dataset or a hub dataset id")
]
DeviceOpt = Annotated[str, typer.Option(help="torch device: cpu, cuda, cuda:1, mps")]


@app.command()
def analyze(
    layer: Annotated[int, typer.Option(help="block whose MLP is studied")] = 3,
    model: ModelOpt = EMBEDDED,
    corpus: CorpusOpt = "embedded",
    tokens: Annotated[int, typer.Option(help="tokens whose feature codes are stored")] = 100_000,
    sae_tokens: Annotated[int, typer.Option(help="tokens each trained SAE sees")] = 400_000,
    ctx_len: Annotated[int, typer.Option(help="tokens per context, BOS included")] = 128,
    device: DeviceOpt = "cpu",
    run_dir: Annotated[str | None, typer.Option(help="default: runs/<model>-L<layer>")] = None,
    sae_in: Annotated[
        str | None, typer.Option(help="SAE directory for mlp_resid at --layer; trained if omitted")
    ] = None,
    sae_out: Annotated[
        str | None, typer.Option(help="SAE directory for mlp_out at --layer; trained if omitted")
    ] = None,
    seed: int = 0,
) -> None:
    """Model → corpus → SAEs at the MLP's input and output → feature codes → summary."""
    from coact.pipeline import AnalyzeConfig
    from coact.pipeline import analyze as run_analyze
    from coact.summary import format_summary

    config = AnalyzeConfig(
        model=model,
        layer=layer,
        corpus=corpus,
        tokens=tokens,
        sae_tokens=sae_tokens,
        ctx_len=ctx_len,
        seed=seed,
        device=device,
        run_dir=run_dir,
        sae_in=sae_in,
        sae_out=sae_out,
    )
    summary = run_analyze(config)
    typer.echo(format_summary(summary))


@app.command("train-sae")
def train_sae(
    site: Annotated[str, typer.Option(help="e.g. mlp_out[3] or mlp_resid[3]")],
    out: Annotated[Path, typer.Option(help="directory for the SAE (SAELens format)")],
    model: ModelOpt = EMBEDDED,
    corpus: CorpusOpt = "embedded",
    tokens: Annotated[int, typer.Option(help="training tokens")] = 400_000,
    expansion: Annotated[int, typer.Option(help="width = expansion × d_model")] = 4,
    k: Annotated[int, typer.Option(help="active latents per token")] = 32,
    device: DeviceOpt = "cpu",
    seed: int = 0,
) -> None:
    """Train a TopK SAE on one site and save it in the SAELens format."""
    from coact import api

    sae = api.train_sae(
        site,
        model=model,
        corpus=corpus,
        tokens=tokens,
        expansion=expansion,
        k=k,
        device=device,
        seed=seed,
        out=out,
    )
    typer.echo(f"saved SAE for {site} (width {sae.width}, k {sae.k}) to {out}")


@app.command()
def collect(
    sae: Annotated[
        list[str], typer.Option(help="SITE=PATH, repeatable, e.g. mlp_out[3]=runs/x/sae/mlp_out.3")
    ],
    out: Annotated[Path, typer.Option(help="directory of the code store")],
    model: ModelOpt = EMBEDDED,
    corpus: CorpusOpt = "embedded",
    tokens: Annotated[int, typer.Option(help="tokens to encode")] = 100_000,
    device: DeviceOpt = "cpu",
    seed: int = 0,
) -> None:
    """Encode a corpus into sparse feature codes with the given SAEs (resumable)."""
    from coact import api
    from coact.sae.base import Sae
    from coact.sites import Site

    pairs: dict[str | Site, str | Path | Sae] = {}
    for item in sae:
        if "=" not in item:
            raise CoactError(f"--sae expects SITE=PATH, got {item!r}")
        site, path = item.split("=", 1)
        pairs[site] = path
    store = api.collect(
        pairs, model=model, corpus=corpus, tokens=tokens, device=device, seed=seed, out=out
    )
    typer.echo(json.dumps({"directory": str(store.directory), "tokens": store.n_tokens}))


def main() -> None:
    """Entry point: user errors become one line on stderr and exit status 2."""
    try:
        app(standalone_mode=False)
    except CoactError as error:
        print(f"coact: error: {error}", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        print("coact: interrupted; re-run the same command to resume", file=sys.stderr)
        sys.exit(130)
    except Exception as error:  # click usage errors carry their own exit code
        import click

        if isinstance(error, click.ClickException):
            error.show()
            sys.exit(error.exit_code)
        raise


__all__ = ["app", "main"]
