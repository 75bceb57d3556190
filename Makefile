# `make test` is self-contained: it creates .venv, installs the package (release build) with
# everything the tests need, then runs the Rust core's tests and the Python suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: test venv install cargo-test pytest bench clean

test: cargo-test pytest

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	touch $@

$(VENV)/.deps: $(VENV)/.created pyproject.toml
	$(PIP) install --quiet "maturin>=1.9.4,<2" numpy pytest hypothesis pandas matplotlib "dask[array,distributed]" safetensors tqdm
	touch $@

venv: $(VENV)/.deps

# Always rebuild: the extension must match the sources under test.
install: venv
	$(PIP) install --quiet --no-deps --force-reinstall .

cargo-test:
	cargo test --quiet

pytest: install
	$(PY) -m pytest -q

bench: install
	for f in benches/bench_*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) target
