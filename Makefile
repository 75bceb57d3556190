# `make test` is self-contained: it creates .venv, installs the package (release build) with
# everything the tests need, then runs the Rust core's tests and the Python suite.
#
# The live-model tests run against the real libraries: torch (CPU), transformers,
# TransformerLens 3.x (HookedTransformer) in the venv, and TransformerLens 4.x (TransformerBridge)
# in $(TL4), a folder of its own put first on PYTHONPATH for a second pytest process (both
# versions are the package `transformer_lens`; TL 4 uses the venv's other dependencies).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TL4    := $(VENV)/tl4

.PHONY: test venv install cargo-test pytest bench clean

test: cargo-test pytest

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	touch $@

$(VENV)/.deps: $(VENV)/.created pyproject.toml Makefile
	$(PIP) install --quiet "maturin>=1.9.4,<2" numpy pytest hypothesis pandas matplotlib "dask[array,distributed]" safetensors tqdm \
		torch transformers "transformer_lens>=3.9,<4"
	$(PIP) install --quiet --no-deps --upgrade --target $(TL4) "transformer_lens>=4.3,<5"
	touch $@

venv: $(VENV)/.deps

# Always rebuild: the extension must match the sources under test.
install: venv
	$(PIP) install --quiet --no-deps --force-reinstall .

cargo-test:
	cargo test --quiet

# HF_HUB_OFFLINE: no test may download anything (models are built from configs).
pytest: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q
	HF_HUB_OFFLINE=1 PYTHONPATH=$(TL4) $(PY) -m pytest -q tests/tl4

bench: install
	for f in benches/bench_*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) target
