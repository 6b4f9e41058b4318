"""The package as `pip install rskip` gives it: the wheel built from this checkout, installed into a fresh virtual
environment outside the checkout, used from an empty folder through its console scripts. The environment reuses this
one's dependencies (installed from constraints.txt) through a `.pth` line, so nothing is downloaded; the checkout's
own `rskip` is not visible there (an editable install needs its `.pth` hook, which only this environment runs)."""

import email
import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from rskip.commands import COMMANDS
from conftest import REPO
from image_helpers import cifar_parquet, tiny_args as image_args  # noqa: F401  (fixture)
from translation_helpers import tiny_args as translation_args
from translation_helpers import write_pairs

# The Python versions the test suite runs on; the wheel's Requires-Python and classifiers must say no more.
TESTED_PYTHONS = ("3.11",)


def build(hook: str, output: Path) -> Path:
    """Build a distribution with setuptools' PEP 517 hook (`build_wheel` or `build_sdist`), as pip does."""
    output.mkdir()
    script = f"from setuptools import build_meta; print(build_meta.{hook}({str(output)!r}))"
    completed = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return output / completed.stdout.split()[-1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build("build_wheel", tmp_path_factory.mktemp("dist") / "wheel")


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> dict:
    """A virtual environment holding the wheel; returns the environment variables that put its commands first."""
    venv = tmp_path_factory.mktemp("user") / "venv"
    # Without pip and setuptools of its own, whose old copies would shadow the dependencies'; this pip installs.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site_packages = next((venv / "lib").glob("python3*/site-packages"))
    (site_packages / "_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python")]
    completed = subprocess.run([*pip, "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    # Every requirement the wheel declares is met by the versions the tests run with.
    completed = subprocess.run([*pip, "check"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "PATH": f"{venv / 'bin'}{os.pathsep}{env['PATH']}", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "HF_HOME": str(venv.parent / "hf-home")}


@pytest.fixture(scope="module")
def empty_folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("empty")


def run(command: list, env: dict, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(list(map(str, command)), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_wheel_holds_the_package_its_data_license_and_commands(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        dist_info = next(name.split("/")[0] for name in names if name.endswith(".dist-info/METADATA"))
        metadata = email.message_from_bytes(archive.read(f"{dist_info}/METADATA"))
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
    assert {"rskip/py.typed", "rskip/training/card_templates/translation.md",
            "rskip/training/card_templates/image_classification.md", f"{dist_info}/licenses/LICENSE"} <= names
    assert not [name for name in names if name.startswith(("tests/", "scripts/"))]
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata["Requires-Python"] == f">={TESTED_PYTHONS[0]}"
    pythons = {value.rsplit(" :: ", 1)[1] for value in metadata.get_all("Classifier")
               if value.startswith("Programming Language :: Python :: 3.")}
    assert pythons == set(TESTED_PYTHONS) and f"{sys.version_info.major}.{sys.version_info.minor}" in pythons
    assert sorted(line for line in entry_points.splitlines() if line.startswith("rskip-")) == sorted(
        f"{command} = {module}:run" for command, module in COMMANDS.items())


def test_the_sdist_carries_no_tests_without_their_helpers_and_data(tmp_path):
    sdist = build("build_sdist", tmp_path / "sdist")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"LICENSE", "pyproject.toml", "README.md", "modeling/training/card_templates/translation.md"} <= names
    assert not [name for name in names if name.startswith(("tests/", "scripts/"))]


def test_installed_commands_train_card_and_refuse_an_offline_push(installed, empty_folder, tmp_path, multi30k_dir,
                                                                  marian_tokenizer, cifar_parquet):
    where = run(["python", "-c", "import rskip; print(rskip.__file__)"], installed, empty_folder)
    assert where.returncode == 0 and "site-packages" in where.stdout and str(REPO) not in where.stdout

    data = write_pairs(tmp_path / "pairs", multi30k_dir)
    runs = {
        "translation": ["rskip-train-translation", *translation_args(
            data, empty_folder / "m30k", marian_tokenizer.name_or_path, "--max_train_steps", "3")],
        "image": ["rskip-train-image-classification", *image_args(
            cifar_parquet, empty_folder / "c10", "--max_train_steps", "3")],
    }
    for name, command in runs.items():
        completed = run(command, installed, empty_folder)
        assert completed.returncode == 0, f"{name}: {completed.stderr[-3000:]}"
        output_dir = Path(command[command.index("--output_dir") + 1])
        assert (output_dir / "README.md").is_file() and (output_dir / "results.json").is_file()
        assert json.loads((output_dir / "results.json").read_text())["command"].startswith(command[0] + " ")

    (empty_folder / "m30k" / "README.md").unlink()
    completed = run(["rskip-model-card", "m30k"], installed, empty_folder)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "rskip-train-translation" in (empty_folder / "m30k" / "README.md").read_text()

    before = {path: path.read_bytes() for path in (empty_folder / "c10").rglob("*") if path.is_file()}
    completed = run(["rskip-push-to-hub", "c10", "someone/c10"], {**installed, "HF_TOKEN": "hf_test"}, empty_folder)
    assert completed.returncode == 1 and "Traceback" not in completed.stderr
    assert completed.stderr.strip().splitlines() == [
        "error: cannot create or write the Hub repository someone/c10: HF_HUB_OFFLINE is set, so the Hub cannot be "
        "reached"]
    assert {path: path.read_bytes() for path in (empty_folder / "c10").rglob("*") if path.is_file()} == before


def test_modules_run_with_python_m_and_the_library_names_the_commands(installed, empty_folder):
    completed = run(["python", "-m", "rskip.commands.train_translation", "--help"], installed, empty_folder)
    assert completed.returncode == 0 and "--skip_variant" in completed.stdout
    completed = run(["python", "-m", "rskip.training"], installed, empty_folder)
    assert completed.returncode == 2 and all(command in completed.stderr for command in COMMANDS)


def test_an_installed_grid_runs_its_runs_with_the_installed_package(installed, empty_folder, cifar_parquet, tmp_path):
    """`rskip-reproduce` starts each run as `python -m rskip.experiments.train_run` in its own process: from the
    wheel, in a folder without the checkout."""
    data_dir = tmp_path / "data"  # <data_dir>/cifar10/train.parquet, as ../shared/data lays it out
    (data_dir / "cifar10").mkdir(parents=True)
    (data_dir / "cifar10" / "train.parquet").symlink_to(cifar_parquet)
    completed = run(["rskip-reproduce", "cifar", "--converged", "--mini", "--seeds", "1", "--data_dir", data_dir,
                     "--output_dir", "grid"], installed, empty_folder)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "| rskip_ln K=2 | 1 of 1 |" in (empty_folder / "grid" / "results.md").read_text()
    for run_dir in (empty_folder / "grid" / "runs").iterdir():
        command = json.loads((run_dir / "results.json").read_text())["command"]
        assert command.startswith("rskip-train-image-classification "), command
