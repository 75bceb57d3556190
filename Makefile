# `make test` is self-contained: it creates .venv, builds the release wheel (`make wheel`: abi3,
# manylinux2014) and installs it with everything the tests need, then runs the Rust core's tests,
# the type checks (mypy --strict, stubtest) and the Python suite, which includes installing that
# wheel into fresh virtual environments with no Rust on PATH (tests/test_wheel.py).
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
# Where `make wheel` writes the wheel.
WHEEL_DIR ?= dist

.PHONY: test venv install wheel wheel-test typecheck cargo-test pytest bench clean

test: cargo-test typecheck pytest

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	touch $@

$(VENV)/.deps: $(VENV)/.created pyproject.toml Makefile
	$(PIP) install --quiet "maturin>=1.9.4,<2" ziglang mypy numpy ml_dtypes pytest hypothesis pandas matplotlib "dask[array,distributed]" safetensors tqdm \
		torch transformers "transformer_lens>=3.9,<4"
	$(PIP) install --quiet --no-deps --upgrade --target $(TL4) "transformer_lens>=4.3,<5"
	touch $@

venv: $(VENV)/.deps

# One wheel for Linux x86_64 with glibc >= 2.17 (manylinux2014: Ubuntu 16.04+, RHEL/CentOS 7+)
# and every CPython >= 3.9 (abi3). zig (PyPI's ziglang, in the venv) links against glibc 2.17.
# Always rebuilt (cargo makes that quick when nothing changed): it must match the sources.
wheel: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" maturin build --quiet --release --zig --compatibility manylinux2014 \
		--features abi3 --out "$(WHEEL_DIR)"

# The tests run against the wheel that ships.
install: wheel
	$(PIP) install --quiet --no-deps --force-reinstall "$$(ls -t "$(WHEEL_DIR)"/induct_fast-*-cp39-abi3-*.whl | head -n 1)"

wheel-test: install
	INDUCT_FAST_WHEEL_DIR="$(abspath $(WHEEL_DIR))" $(PY) -m pytest -q tests/test_wheel.py

# The package's annotations (mypy --strict) and the extension's stub against the built module
# (stubtest; pyproject.toml's [tool.mypy] tells both about the untyped third-party packages).
typecheck: install
	$(PY) -m mypy --strict python/induct_fast
	$(PY) -m mypy.stubtest induct_fast --mypy-config-file pyproject.toml

cargo-test:
	cargo test --quiet

# HF_HUB_OFFLINE: no test may download anything (models are built from configs).
pytest: install
	INDUCT_FAST_WHEEL_DIR="$(abspath $(WHEEL_DIR))" HF_HUB_OFFLINE=1 $(PY) -m pytest -q
	HF_HUB_OFFLINE=1 PYTHONPATH=$(TL4) $(PY) -m pytest -q tests/tl4

bench: install
	for f in benches/bench_*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) target dist
