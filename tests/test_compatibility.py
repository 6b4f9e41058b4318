"""Both ends of the tested library range (`rskip.library_versions.TESTED_VERSIONS`).

- Oldest: folders saved here load with `trust_remote_code=True` in an environment with the oldest tested transformers
  and timm and without rskip, with this environment's outputs exactly, pipelines included.
- Below it: loading a folder raises one `ImportError` that names the installed version, the range and the fix.
- Newest: `tests/test_marian.py` (the Marian layer overrides) passes under the newest tested transformers.

The other environments are virtual environments in `.cache/compat-envs/`, one per set of versions, built on first use
(PyPI and pip's cache), in parallel. Each sees this environment's packages through a `.pth` line, torch included
(never another torch), and holds its own transformers/timm and the dependencies pip resolves for them, which shadow
this environment's. The releases below the oldest are installed alone into folders put first on `PYTHONPATH` over the
oldest environment. rskip is importable only where a test puts it (the newest environment, from this checkout).
"""

import os
import shutil
import subprocess
import sys
import sysconfig
from importlib.metadata import version
from pathlib import Path

import pytest
import timm
import torch

from rskip.library_versions import TESTED_VERSIONS

from compat_save_folders import save_folders

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
ENVS = REPO / ".cache" / "compat-envs"
OLDEST = {library: oldest for library, (oldest, _) in TESTED_VERSIONS.items()}
NEWEST_TRANSFORMERS = TESTED_VERSIONS["transformers"][1]
# The release before each oldest tested version.
BELOW_OLDEST = {"transformers": "5.3.0", "timm": "1.0.15"}


def site_packages(root: Path) -> Path:
    return root / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def run(command: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(part) for part in command], capture_output=True, text=True, **kwargs)


def fresh_env(**extra) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": "", "OMP_NUM_THREADS": str(torch.get_num_threads()),
            **extra}


class Install:
    """`pip install` of ``requirements`` into `.cache/compat-envs/<name>`, started at once so that installs overlap
    (they wait mostly on downloads), and skipped when a complete one is there.

    A virtual environment (``target=False``) sees this environment's packages through a `.pth` line; pip resolves
    the requirements' dependencies against them, keeping this torch and torchvision. A target folder holds
    ``requirements`` only (no dependencies), to put first on `PYTHONPATH` over such an environment.
    """

    def __init__(self, name: str, requirements: list[str], target: bool = False):
        self.root = ENVS / f"{name}-torch-{version('torch')}"
        self.requirements = requirements
        self.process = None
        if (self.root / ".complete").exists():
            return
        shutil.rmtree(self.root, ignore_errors=True)
        pip = [sys.executable, "-m", "pip"]
        install = ["install", "--quiet", "--disable-pip-version-check"]
        if target:
            command = [*pip, *install, "--no-deps", "--target", self.root, *requirements]
        else:
            result = run([sys.executable, "-m", "venv", "--without-pip", self.root])
            assert result.returncode == 0, result.stderr
            ours = sysconfig.get_paths()["purelib"]
            parents = [ours, *(path for path in sys.path if path.endswith("site-packages") and path != ours)]
            (site_packages(self.root) / "_compat_parent.pth").write_text("\n".join(dict.fromkeys(parents)) + "\n")
            (self.root / "constraints.txt").write_text(
                "".join(f"{name}=={version(name)}\n" for name in ("torch", "torchvision")))
            command = [*pip, "--python", self.root / "bin" / "python", *install, "-c", self.root / "constraints.txt",
                       *requirements]
        self.process = subprocess.Popen([str(part) for part in command], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)

    def path(self) -> Path:
        if self.process is not None:
            _, stderr = self.process.communicate(timeout=600)
            if self.process.returncode != 0:
                pytest.fail(f"could not build {self.root} (it needs PyPI or pip's cache): pip install "
                            f"{' '.join(self.requirements)}\n{stderr[-3000:]}", pytrace=False)
            (self.root / ".complete").touch()
            self.process = None
        return self.root


@pytest.fixture(scope="module")
def installs() -> dict[str, Install]:
    oldest = [f"{library}=={OLDEST[library]}" for library in ("transformers", "timm")]
    return {
        "oldest": Install(f"transformers-{OLDEST['transformers']}-timm-{OLDEST['timm']}", oldest),
        "newest": Install(f"transformers-{NEWEST_TRANSFORMERS}", [f"transformers=={NEWEST_TRANSFORMERS}"]),
        **{library: Install(f"{library}-{older}-only", [f"{library}=={older}"], target=True)
           for library, older in BELOW_OLDEST.items()},
    }


@pytest.fixture(scope="module")
def oldest_env(installs) -> Path:
    return installs["oldest"].path() / "bin" / "python"


def versions_in(python: Path, **env) -> dict:
    script = "import importlib.util, timm, torch, transformers; print(transformers.__version__, timm.__version__, " \
             "torch.__version__, importlib.util.find_spec('rskip') is not None)"
    result = run([python, "-c", script], env=fresh_env(**env))
    assert result.returncode == 0, result.stderr
    transformers_version, timm_version, torch_version, has_rskip = result.stdout.split()
    return dict(transformers=transformers_version, timm=timm_version, torch=torch_version, rskip=has_rskip == "True")


@pytest.fixture(scope="module")
def saved_folders(tmp_path_factory) -> list[Path]:
    return save_folders(tmp_path_factory.mktemp("compat-folders"))


def test_saved_folders_load_without_rskip_under_the_oldest_tested_versions(installs, saved_folders, oldest_env,
                                                                           tmp_path):
    assert versions_in(oldest_env) == dict(**OLDEST, torch=torch.__version__, rskip=False)
    result = run([oldest_env, TESTS_DIR / "compat_load_folders.py", *saved_folders], cwd=tmp_path,
                 env=fresh_env(HF_MODULES_CACHE=str(tmp_path / "modules")), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert result.stdout.split("\n")[:-1] == [f"ok {folder}" for folder in saved_folders]


LOAD_SCRIPT = """
import sys
from transformers import AutoConfig
AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True)
"""


@pytest.mark.parametrize("library", ["transformers", "timm"])
def test_loading_below_the_oldest_tested_version_raises_one_import_error(library, installs, oldest_env, saved_folders,
                                                                         tmp_path):
    older = BELOW_OLDEST[library]
    # The oldest environment with only `library` older.
    env = dict(PYTHONPATH=str(installs[library].path()), HF_MODULES_CACHE=str(tmp_path / "modules"))
    assert versions_in(oldest_env, **env) == dict(OLDEST, **{library: older}, torch=torch.__version__, rskip=False)
    oldest, newest = TESTED_VERSIONS[library]
    message = (f"ImportError: this rskip model needs {library}>={oldest}, but {library} {older} is installed "
               f"(tested range: {library} {oldest} to {newest}); upgrade with: pip install '{library}>={oldest}'")
    # One folder of each model family that needs the library (the check runs when the config file is imported).
    marian, resnet = (next(folder for folder in saved_folders if folder.name.startswith(family))
                      for family in ("marian", "resnet"))
    for folder in [marian, resnet] if library == "transformers" else [resnet]:
        result = run([oldest_env, "-c", LOAD_SCRIPT, folder], cwd=tmp_path, env=fresh_env(**env), timeout=300)
        assert result.returncode == 1
        assert result.stderr.strip().endswith(message), result.stderr[-3000:]
        assert result.stderr.count("Traceback") == 1, result.stderr[-3000:]  # no other exception around it


def test_marian_tests_pass_under_the_newest_tested_transformers(installs, tmp_path):
    root = installs["newest"].path()
    python = root / "bin" / "python"
    # rskip from this checkout: its package folder under the name it is imported by.
    link = site_packages(root) / "rskip"
    if not link.is_symlink():
        link.symlink_to(REPO / "modeling", target_is_directory=True)
    assert versions_in(python) == dict(transformers=NEWEST_TRANSFORMERS, timm=timm.__version__,
                                       torch=torch.__version__, rskip=True)
    result = run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", tmp_path / "pytest",
                  "tests/test_marian.py"], cwd=REPO, env=fresh_env(), timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and " failed" not in result.stdout and " skipped" not in result.stdout, \
        result.stdout[-2000:]



def test_cpu_generation_uses_no_private_fx_function(caplog):
    """The skip's CPU inference path tests for FX tracing with the public `torch.fx.Proxy`: torch's private
    `is_fx_tracing` logs a deprecation warning the first time it is called (a cache that is cleared here)."""
    from torch.fx import _symbolic_trace

    from test_marian import inputs, rskip_model

    _symbolic_trace.is_fx_tracing_warning.cache_clear()
    model = rskip_model("rskip_ln", skip_recursions=2)
    batch = inputs()
    with caplog.at_level("WARNING"):
        tokens = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=3)
    assert tokens.shape[0] == batch["input_ids"].shape[0]
    assert not [record for record in caplog.records if "is_fx_tracing" in record.getMessage()], caplog.text
