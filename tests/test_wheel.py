"""The wheel `make wheel` builds (abi3, manylinux2014) installs into a fresh virtual environment
of the oldest and the newest Python at hand, with no Rust anywhere on PATH, and runs the demo.

`make test` builds the wheel first and passes its folder in INDUCT_FAST_WHEEL_DIR; run alone,
`make wheel-test` does the same.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import induct_fast as inf

WHEEL_DIR = os.environ.get("INDUCT_FAST_WHEEL_DIR")
pytestmark = pytest.mark.skipif(not WHEEL_DIR, reason="needs a built wheel: run `make wheel-test` (make test does)")

# The oldest CPython the stable ABI is built for, and the newest, where this machine has them.
VERSIONS = ("3.9", "3.13")


def newest_wheel() -> Path:
    wheels = sorted(Path(WHEEL_DIR or ".").glob(f"induct_fast-{inf.__version__}-*.whl"), key=lambda p: p.stat().st_mtime)
    assert wheels, f"no induct_fast {inf.__version__} wheel in {WHEEL_DIR}"
    return wheels[-1]


def interpreters() -> list[str]:
    """A working interpreter of each of VERSIONS (on PATH, or installed by pyenv, whose shims
    exist for versions that are not selected); the running one when none works."""
    found = []
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    for version in VERSIONS:
        options = [shutil.which(f"python{version}"), *sorted(map(str, pyenv.glob(f"{version}.*/bin/python{version}")))]
        for path in filter(None, options):
            if subprocess.run([path, "-c", "import venv, ensurepip"], capture_output=True).returncode == 0:
                found.append(path)
                break
    return found or [sys.executable]


def test_wheel_is_abi3_manylinux2014():
    wheel = newest_wheel()
    assert "-cp39-abi3-" in wheel.name and "manylinux2014_x86_64" in wheel.name, wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    assert "induct_fast/_core.abi3.so" in names and "induct_fast/py.typed" in names
    assert not any(name.startswith("induct_fast/") and name.endswith(".so") and "abi3" not in name for name in names)


@pytest.mark.parametrize("python", interpreters())
def test_wheel_installs_and_runs_the_demo_without_rust(python, tmp_path):
    wheel = newest_wheel()
    venv = tmp_path / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True, capture_output=True)
    bin_dir = venv / "bin"
    path = os.pathsep.join([str(bin_dir), "/usr/bin", "/bin"])
    assert shutil.which("cargo", path=path) is None and shutil.which("rustc", path=path) is None
    env = {"PATH": path, "HOME": str(tmp_path), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    for name in ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_CERT", "SSL_CERT_FILE", "PIP_CACHE_DIR"):
        if name in os.environ:
            env[name] = os.environ[name]
    env.setdefault("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip"))  # the machine's cache, not tmp HOME's
    install = subprocess.run([str(bin_dir / "pip"), "install", "--quiet", str(wheel)], capture_output=True, text=True, env=env)
    assert install.returncode == 0, install.stderr[-2000:]
    # Only binaries: a source build would need the Rust this PATH lacks.
    demo = subprocess.run([str(bin_dir / "induct-fast"), "demo", "--json"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr[-2000:]
    report = json.loads(demo.stdout)  # the hand-built circuit is found
    assert report["induction_head"] == [1, 2] and report["previous_token_head"] == [0, 1]
    where = subprocess.run([str(bin_dir / "python"), "-c", "import induct_fast, sys; print(induct_fast._core.__file__)"],
                             capture_output=True, text=True, env=env, cwd=tmp_path)
    assert where.stdout.strip().endswith("_core.abi3.so"), where
