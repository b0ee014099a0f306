"""The wheel installs one top-level name, ``neurostore``, and its console script works from it.

Built from a copy of the sources (so no build/ or egg-info lands in the checkout) and installed with
``--no-deps`` into a fresh venv that sees this interpreter's site-packages through a path file: the
dependencies are the ones already installed, the neurostore code is the wheel's own (no editable
install, and the repository is not on the path).
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

import synth

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_installs_neurostore_only(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("neurostore", "cli", "benchmarks", "data"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    try:  # build with the installed setuptools when it is new enough (license = "MIT" needs 77); else pip fetches one
        import setuptools

        isolation = ["--no-build-isolation"] if int(setuptools.__version__.split(".")[0]) >= 77 else []
    except ImportError:
        isolation = []
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(dist), str(src)],
                   check=True, cwd=tmp_path)
    (wheel,) = dist.glob("neurostore-*.whl")
    with zipfile.ZipFile(wheel) as z:
        tops = {n.split("/")[0] for n in z.namelist() if not n.split("/")[0].endswith(".dist-info")}
        names = z.namelist()
    assert tops == {"neurostore"}, tops
    assert "neurostore/cli/main.py" in names and not any(n.startswith("benchmarks") for n in names)
    assert "neurostore/data/emotions.jsonl" in names and not any(n.startswith("neurostore/data/speech") for n in names)

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    bindir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    py = bindir / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    here = [p for p in dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages(),
                                      *(p for p in sys.path if p.endswith("site-packages"))]) if os.path.isdir(p)]
    Path(purelib, "_deps.pth").write_text("\n".join(here) + "\n")
    # this interpreter's pip, run by the venv's python: the script lands in the venv with its shebang
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True,
                   env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    store = synth.make_store(str(tmp_path / "store"), n_docs=12)
    where = subprocess.run([str(py), "-c", "import neurostore, importlib.util as u; print(neurostore.__file__); print(u.find_spec('cli'))"],
                           check=True, capture_output=True, text=True, cwd=tmp_path, env=env).stdout.split("\n")
    assert where[0].startswith(purelib), where
    assert where[1] == "None", where  # no top-level `cli` installed
    script = bindir / "neurostore"
    helped = subprocess.run([str(script), "--help"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert helped.returncode == 0 and "extract" in helped.stdout, helped.stderr
    sample = subprocess.run([str(py), "-c", "from neurostore.cli.options import SAMPLE_CORPUS as s; print(s, s.is_file())"],
                            check=True, capture_output=True, text=True, cwd=tmp_path, env=env).stdout.split()
    assert sample[0].startswith(purelib) and sample[1] == "True", sample  # the demo's corpus is in the wheel
    info = subprocess.run([str(script), "info", store.path], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert info.returncode == 0, info.stderr
    assert "resid" in info.stdout and "Traceback" not in info.stderr
