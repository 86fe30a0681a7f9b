# coact tasks. `just analyze 3` studies block 3 of the embedded default model.

set shell := ["bash", "-euo", "pipefail", "-c"]

python := env_var_or_default("PYTHON", "python")

# Install coact with its development tools (the CPU build of torch first, never upgraded).
install:
    {{python}} -c "import torch" 2>/dev/null || {{python}} -m pip install -q torch==2.13.0
    {{python}} -m pip install -q -e '.[dev]'

# Run the main job on block LAYER; extra ARGS go to `coact analyze` (e.g. --model, --tokens).
analyze LAYER="3" *ARGS:
    {{python}} -m coact analyze --layer {{LAYER}} {{ARGS}}

# Every block: MLP, attention and residual composition per layer, at the survey budget
# unless ARGS say `--budget full`; resumes where a killed run stopped.
analyze-all *ARGS:
    {{python}} -m coact analyze --layers all {{ARGS}}

# The default test suite (includes one integration test on the real SmolLM2).
test *ARGS:
    {{python}} -m pytest -q --durations=25 {{ARGS}}

# Lint, format check and type check.
lint:
    ruff check .
    ruff format --check .
    mypy

# Benchmarks: collection throughput, store size and the SAE training step, written to
# analyses/results/*.json (the connector, calibration and logic benchmarks run on their own).
bench:
    {{python}} analyses/bench_collect.py
    {{python}} analyses/bench_sae_train.py

# Build the project's documentation into site/ (benchmark and convergence figures redrawn from
# analyses/results/).
docs:
    {{python}} analyses/plot_benchmarks.py
    {{python}} analyses/plot_convergence.py
    mkdocs build --strict

# The report in headless Chromium (Debian's /usr/bin/chromium; skips without it).
browser *ARGS:
    {{python}} -m pytest -q tests/test_browser.py {{ARGS}}
