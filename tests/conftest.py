import gzip
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `make test` runs one pytest-xdist worker per core: each with one torch thread (and so the processes it starts), or
# the workers' threads fight over the cores (a tiny Marian's training step took 8x as long with two threads each).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
# The demo and the Trainer examples are scripts, not package modules: their tests import them from scripts/.
sys.path.insert(0, str(REPO / "scripts"))


def read_lines(path: Path, limit: int | None = None) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [line.rstrip("\n") for line in itertools.islice(handle, limit)]


@pytest.fixture(scope="session")
def multi30k_dir() -> Path:
    path = SHARED_DATA / "multi30k"
    if not (path / "train.en.gz").exists():
        raise FileNotFoundError(f"{path} must hold Multi30k (train.en.gz, ...): the tests read ../shared/data")
    return path


@pytest.fixture(scope="session")
def marian_tokenizer(multi30k_dir, tmp_path_factory):
    """A MarianTokenizer trained on 300 Multi30k training pairs (EN-DE)."""
    from rskip.tokenization import train_marian_tokenizer

    source = read_lines(multi30k_dir / "train.en.gz", 300)
    target = read_lines(multi30k_dir / "train.de.gz", 300)
    return train_marian_tokenizer(source, target, tmp_path_factory.mktemp("tokenizer"), vocab_size=400,
                                  source_lang="en", target_lang="de")


@pytest.fixture
def run_python(tmp_path):
    """Run a Python script in a fresh interpreter (this environment's), from a folder outside the repository."""
    def run(script: str, *args, timeout: int = 300) -> subprocess.CompletedProcess:
        workdir = tmp_path / "fresh-process"
        workdir.mkdir(exist_ok=True)
        # The parent's thread count, so that outputs compared across the two processes are computed alike.
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": "", "OMP_NUM_THREADS": str(torch.get_num_threads())}
        result = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=workdir, env=env,
                                capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
        return result

    return run
