"""timm's own model tests (`tests/test_models.py` of the timm sdist, fetched once with pip) on rskip's models.

The models run: preact_resnet20/164 and rskip_resnet18/50 with their default rSkip+LN, plus the other skip variants
registered by `rskip_timm_plugin`. timm picks the models of its `forward_intermediates`/pruning tests by timm module
name, which rskip's models lack, so those tests are called by hand. Tests that do not apply (listed in the README):
TorchScript (`torch.jit.script`, deprecated in torch 2.14, cannot compile the norm-bearing skips), the tests of
published pretrained weights (there are none), and the config test of non-standard (transformer) models.
"""

import os
import re
import subprocess
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

import pytest
import timm

TESTS_DIR = Path(__file__).resolve().parent
CACHE = TESTS_DIR.parent / ".cache"
MODELS = ("preact_resnet20", "preact_resnet164", "rskip_resnet18", "rskip_resnet50")
INTERMEDIATE_MODELS = ("preact_resnet20", "rskip_resnet18")  # the same model classes as the deeper ones
TIMM_TESTS = {
    "test_model_forward",
    "test_model_backward",
    "test_model_default_cfgs",
    "test_model_forward_features",
    "test_model_forward_fx",
    "test_model_backward_fx",
}


@pytest.fixture(scope="module")
def timm_sdist() -> Path:
    """The unpacked timm sdist of the installed version, downloaded into .cache/ on first use."""
    version = timm.__version__
    root = CACHE / f"timm-{version}"
    if not (root / "tests" / "test_models.py").exists():
        command = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--quiet",
                   f"timm=={version}", "--dest", str(CACHE)]
        result = subprocess.run(command, capture_output=True, text=True)
        archive = CACHE / f"timm-{version}.tar.gz"
        if result.returncode != 0 or not archive.exists():
            pytest.fail(f"could not fetch timm {version}'s tests, which ship only in its sdist: `{' '.join(command)}` "
                        f"needs PyPI.\n{result.stderr}", pytrace=False)
        with tarfile.open(archive) as sdist:
            sdist.extractall(CACHE, filter="data")
    return root


def run_in_sdist(command: list[str], timm_sdist: Path) -> subprocess.CompletedProcess:
    # Many small models: one thread each is faster on 2 cores than two that contend.
    env = dict(os.environ, PYTHONPATH=str(TESTS_DIR), TORCH_DEVICE="cpu", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=timm_sdist, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    return result


def test_timm_model_tests_pass_on_rskip_models(timm_sdist):
    expression = f"({' or '.join(MODELS)}) and not torchscript"
    result = run_in_sdist([sys.executable, "-m", "pytest", "tests/test_models.py", "-p", "rskip_timm_plugin",
                           "-p", "no:cacheprovider", "-q", "-rA", "-W", "ignore::pytest.PytestUnknownMarkWarning",
                           "-k", expression], timm_sdist)

    passed = defaultdict(set)
    for test, model in re.findall(r"^PASSED \S+::(test_\w+)\[\d+-(\w+)\]", result.stdout, flags=re.MULTILINE):
        passed[model].add(test)
    assert set(MODELS) <= set(passed), sorted(passed)
    assert all(tests == TIMM_TESTS for tests in passed.values()), dict(passed)


def test_timm_intermediate_feature_tests_pass_on_rskip_models(timm_sdist):
    script = f"""
import rskip_timm_plugin
from tests import test_models

for model in [*{INTERMEDIATE_MODELS!r}, *rskip_timm_plugin.VARIANT_MODELS]:
    test_models.test_model_forward_intermediates(model, batch_size=1)
    test_models.test_model_forward_intermediates_features(model, batch_size=1)
    test_models.test_prune_intermediate_layers_contract(model)
    print("passed", model)
"""
    result = run_in_sdist([sys.executable, "-c", script], timm_sdist)
    assert set(INTERMEDIATE_MODELS) <= set(re.findall(r"^passed (\w+)$", result.stdout, flags=re.MULTILINE))
