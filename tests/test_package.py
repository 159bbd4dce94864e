"""The package builds (`python -m build`: an sdist and a wheel) and the wheel installs in a fresh virtualenv.

The venv sees this machine's site-packages (torch and the rest are not downloaded again) and the wheel is
installed with --no-deps, so nothing touches the network. About 20 s.
"""

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".git", "runs", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis", "notebooks",
                              ".pytest_cache", "docs", "benchmarks")


def _run(*command, cwd=None):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
    result = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(map(str, command))}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_the_wheel_installs_in_a_fresh_venv(tmp_path):
    source, dist = tmp_path / "source", tmp_path / "dist"
    shutil.copytree(ROOT, source, ignore=SKIP)  # the build writes egg-info and build/ beside the sources
    # --no-isolation: setuptools from this environment (the test extra), no download of a build environment
    _run(sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, source)
    (wheel,), (sdist,) = dist.glob("qlora_magic-*.whl"), dist.glob("qlora_magic-*.tar.gz")
    assert "qlora_magic/examples/word_forms.jsonl" in zipfile.ZipFile(wheel).namelist()
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"pyproject.toml", "README.md", "qlora_magic/examples/word_forms.jsonl", "qlora_magic/__init__.py"} <= names

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--system-site-packages", venv)
    python = venv / "bin" / "python"
    _run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--disable-pip-version-check", wheel)
    out = _run(python, "-c", "import qlora_magic, qlora_magic.examples as e, qlora_magic.front.magics;"
                             "print(qlora_magic.__file__); print(e.path('word_forms')); print(qlora_magic.__version__)",
               cwd=tmp_path)
    module, data, version = out.split()
    assert Path(module).is_relative_to(venv) and Path(data).is_relative_to(venv) and Path(data).stat().st_size > 0
    assert wheel.name.startswith(f"qlora_magic-{version}-")
