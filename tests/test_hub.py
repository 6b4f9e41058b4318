"""rskip.training.hub and scripts/push_to_hub.py: start-up checks, uploads during training (--hub_strategy), a failed
upload, resuming from the Hub's last-checkpoint/, timm's format of image models, pushing a finished run.

The Hub is unreachable here. The upload side is tested at the huggingface_hub boundary (`FakeHub` patches `HfApi`'s
network calls and applies each `upload_folder` to a local "remote" folder); the download side through huggingface_hub's
real cache code: the remote is laid out as a snapshot in a temporary HF_HUB_CACHE and read with HF_HUB_OFFLINE=1."""

import fnmatch
import json
import shutil
import threading
from pathlib import Path
from unittest import mock

import httpx2
import huggingface_hub
import pytest
import timm
import torch
from huggingface_hub.errors import HfHubHTTPError
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification

from rskip.commands import push_to_hub
from rskip.commands import train_image_classification
from rskip.commands import train_translation
from rskip.training import TrainingError
from rskip.training.cli import run_main
from rskip.training.hub import check_hub_access, download_last_checkpoint
from rskip.training.translation import TranslationTask
from image_helpers import cifar_parquet, one_torch_thread  # noqa: F401  (fixtures)
from image_helpers import tiny_args as image_args
from translation_helpers import tiny_args as translation_args
from translation_helpers import write_pairs


def http_error(status: int) -> HfHubHTTPError:
    request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
    return HfHubHTTPError(f"{status} Client Error", response=httpx2.Response(status, request=request))


class FakeHub:
    """`HfApi`'s network calls, patched: `create_repo`, `auth_check`, `create_branch` and `upload_folder` are
    recorded; each upload is applied to `remote` (its files at the call, its delete patterns), or raises the next
    error of `failures` (None: succeed)."""

    def __init__(self, remote: Path, failures=()):
        self.remote, self.failures = remote, list(failures)
        self.uploads, self.threads, self.running, self.overlapped = [], [], 0, False
        self.create_repo = mock.MagicMock(return_value="https://huggingface.co/someone/model")
        self.auth_check, self.create_branch = mock.MagicMock(), mock.MagicMock()

    def upload_folder(self, **kwargs):
        self.running += 1
        self.overlapped |= self.running > 1
        try:
            folder = Path(kwargs["folder_path"])
            files = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
            self.uploads.append({**kwargs, "files": files})
            self.threads.append(threading.current_thread())
            error = self.failures.pop(0) if self.failures else None
            if error is not None:
                raise error
            target = self.remote / kwargs.get("path_in_repo", ".")
            for pattern in kwargs.get("delete_patterns") or []:
                for old in [path for path in target.rglob("*") if path.is_file()]:
                    if fnmatch.fnmatch(old.relative_to(target).as_posix(), pattern):
                        old.unlink()
            for name in files:
                if not any(fnmatch.fnmatch(name, pattern) for pattern in kwargs.get("ignore_patterns") or []):
                    (target / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(folder / name, target / name)
            return mock.MagicMock(pr_url=None, __str__=lambda _: "https://huggingface.co/someone/model/commit/1")
        finally:
            self.running -= 1

    def __enter__(self):
        self.patches = [mock.patch.object(huggingface_hub.HfApi, name, getattr(self, name))
                        for name in ("create_repo", "auth_check", "create_branch")]
        self.patches.append(mock.patch.object(huggingface_hub.HfApi, "upload_folder",
                                              lambda api, **kwargs: self.upload_folder(**kwargs)))
        self.patches.append(mock.patch.dict("os.environ", {"HF_TOKEN": "hf_test"}))
        for patch in self.patches:
            patch.start()
        return self

    def __exit__(self, *exc):
        for patch in reversed(self.patches):
            patch.stop()


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A temporary HF_HUB_CACHE; `publish(repo_id, folder, revision)` lays `folder` out there as the repository's
    snapshot at `revision`, as a download would have left it."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    def publish(repo_id: str, folder: Path, revision: str = "main", commit: str = "c0ffee" * 6 + "abcd") -> None:
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(folder, repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / revision).write_text(commit)

    return publish


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, multi30k_dir):
    return write_pairs(tmp_path_factory.mktemp("pairs"), multi30k_dir)


@pytest.fixture(scope="module")
def tokenizer_dir(marian_tokenizer):
    return marian_tokenizer.name_or_path


# ----------------------------------------------------------------------------------------- start-up checks

@pytest.mark.parametrize("token, repo_id, error, message", [
    (None, "someone/model", None, "needs a token: pass --hub_token, set HF_TOKEN"),
    ("hf_test", "someone/bad--name", None, "is not a valid Hub repository id"),
    ("hf_test", "someone/model", http_error(401), "rejected the token (HTTP 401"),
    ("hf_test", "someone/model", http_error(403), "may not create or write this repository (HTTP 403"),
    ("hf_test", "someone/model", httpx2.ConnectError("no route to host"), "the Hub is unreachable"),
])
def test_start_up_check_says_what_is_wrong(token, repo_id, error, message):
    with mock.patch.object(huggingface_hub.HfApi, "create_repo", side_effect=error), \
            mock.patch.object(huggingface_hub.HfApi, "auth_check"):
        with pytest.raises(TrainingError, match=message.replace("(", r"\(")):
            check_hub_access(repo_id, token)


def test_start_up_check_needs_write_access_to_an_existing_repository():
    with mock.patch.object(huggingface_hub.HfApi, "create_repo"), \
            mock.patch.object(huggingface_hub.HfApi, "auth_check", side_effect=http_error(403)):
        with pytest.raises(TrainingError, match="may not create or write"):
            check_hub_access("someone/model", "hf_test")


def test_offline_hub_fails_before_any_data_is_read(tmp_path, pairs, tokenizer_dir, monkeypatch):
    """The real huggingface_hub with HF_HUB_OFFLINE=1: the run stops at start-up, before loading data."""
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    with mock.patch.object(TranslationTask, "load_data", side_effect=AssertionError("data loaded")):
        with pytest.raises(TrainingError, match="cannot create or write the Hub repository someone/model: "
                                                "HF_HUB_OFFLINE is set"):
            train_translation.main(translation_args(pairs, tmp_path / "run", tokenizer_dir, "--push_to_hub",
                                                    "--hub_model_id", "someone/model"))


def test_no_token_fails_before_any_data_is_read(tmp_path, pairs, tokenizer_dir, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with mock.patch("rskip.training.hub.get_token", return_value=None), \
            mock.patch.object(TranslationTask, "load_data", side_effect=AssertionError("data loaded")):
        with pytest.raises(TrainingError, match="needs a token"):
            train_translation.main(translation_args(pairs, tmp_path / "run", tokenizer_dir, "--push_to_hub"))


# ------------------------------------------------------------------------------------ uploads during training

@pytest.fixture(scope="module")
def pushed_run(tmp_path_factory, pairs, tokenizer_dir):
    """4 updates, validation and a checkpoint every 2, --hub_strategy all_checkpoints; the upload of
    checkpoints/step_2 fails once with HTTP 503."""
    root = tmp_path_factory.mktemp("pushed")
    output_dir = root / "run"
    failures = [None, None, http_error(503)]  # step 2: best model, last-checkpoint, checkpoints/step_2
    with FakeHub(root / "remote", failures) as hub, mock.patch("builtins.print") as printed:
        results = train_translation.main(translation_args(
            pairs, output_dir, tokenizer_dir, "--checkpointing_steps", "2", "--push_to_hub",
            "--hub_model_id", "someone/m30k", "--hub_strategy", "all_checkpoints"))
    log = "\n".join(" ".join(map(str, call.args)) for call in printed.call_args_list)
    return output_dir, results, hub, log


def test_every_checkpoint_uploads_best_model_training_state_and_checkpoint_in_order(pushed_run):
    _, _, hub, _ = pushed_run
    destinations = [(upload["path_in_repo"], upload["commit_message"].split(":")[0]) for upload in hub.uploads]
    assert destinations == [
        (".", "Step 2"), ("last-checkpoint", "Step 2"), ("checkpoints/step_2", "Step 2"),  # the last one fails
        ("checkpoints/step_2", "Step 2"),  # retried at the next checkpoint
        (".", "Step 4"), ("last-checkpoint", "Step 4"), ("checkpoints/step_4", "Step 4"),
        (".", "End of training, step 4"),
    ]
    assert all(upload["repo_id"] == "someone/m30k" for upload in hub.uploads)
    assert not hub.overlapped


def test_uploads_run_in_the_background(pushed_run):
    _, _, hub, log = pushed_run
    assert threading.main_thread() not in hub.threads and len(set(hub.threads)) == 1
    assert "Waiting for 1 upload to the Hub (someone/m30k) to finish" in log


def test_commit_messages_name_the_step_and_the_scores(pushed_run):
    _, _, hub, _ = pushed_run
    for upload in hub.uploads:
        assert "validation BLEU" in upload["commit_message"] and "chrF" in upload["commit_message"]
    assert hub.uploads[1]["commit_message"].startswith("Step 2: training state in last-checkpoint/")


def test_model_uploads_leave_out_training_state_logs_and_tokenizer_folder(pushed_run):
    _, _, hub, _ = pushed_run
    for upload in (hub.uploads[0], hub.uploads[-1]):
        assert {"checkpoints/*", "best_model/*", "logs/*", "tokenizer/*"} <= set(upload["ignore_patterns"])
        assert {"README.md", "results.json", "config.json", "model.safetensors", "tokenizer_config.json"} <= \
            set(upload["files"])
        assert not [name for name in upload["files"] if name.split("/")[0] in ("checkpoints", "best_model", "logs")]
    assert "model-index" in (hub.remote / "README.md").read_text()


def test_training_state_replaces_last_checkpoint(pushed_run):
    _, _, hub, _ = pushed_run
    assert hub.uploads[5]["delete_patterns"] == ["*"] and "run_state.json" in hub.uploads[5]["files"]
    assert json.loads((hub.remote / "last-checkpoint" / "run_state.json").read_text())["step"] == 4
    assert sorted(path.name for path in (hub.remote / "checkpoints").iterdir()) == ["step_2", "step_4"]


def test_a_failed_upload_is_logged_and_training_goes_on(pushed_run):
    output_dir, results, _, log = pushed_run
    assert results["steps"] == 4
    failures = [line for line in log.splitlines() if "Upload to the Hub failed" in line]
    assert len(failures) == 1 and "HTTP 503" in failures[0] and "retried at the next checkpoint" in failures[0]
    assert not list(output_dir.glob("rskip-hub-*")) and (output_dir / "README.md").is_file()


def test_a_failed_final_upload_is_one_error_naming_the_command_that_completes_it(tmp_path, pairs, tokenizer_dir,
                                                                                capsys):
    output_dir = tmp_path / "run"
    with FakeHub(tmp_path / "remote", [http_error(503)]), pytest.raises(SystemExit) as exit_info:
        run_main(lambda: train_translation.main(translation_args(pairs, output_dir, tokenizer_dir, "--push_to_hub",
                                                                 "--hub_model_id", "someone/m30k")))
    assert exit_info.value.code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: the run finished, but 1 upload(s) to someone/m30k failed; the output folder is "
                      f"complete: push it with `rskip-push-to-hub {output_dir} someone/m30k`"]
    for name in ("results.json", "README.md", "model.safetensors"):
        assert (output_dir / name).is_file(), name


def test_the_token_is_written_nowhere(pushed_run):
    output_dir, _, hub, _ = pushed_run
    for folder in (output_dir, hub.remote):
        for path in folder.rglob("*"):
            if path.is_file():
                assert b"hf_test" not in path.read_bytes(), path


# --------------------------------------------------------------------------------------- resume from the Hub

def test_a_run_resumed_from_the_hub_ends_with_the_same_weights(tmp_path, pairs, tokenizer_dir, hub_cache):
    """Run A trains 6 updates. Run B trains 3 on one machine, pushing its training state; a new machine (another
    output folder) resumes from the Hub's last-checkpoint/, read through the huggingface_hub cache offline."""
    common = ["--gradient_accumulation_steps", "2", "--checkpointing_steps", "3", "--eval_steps", "3"]
    train_translation.main([*translation_args(pairs, tmp_path / "a", tokenizer_dir, *common), "--max_train_steps", "6"])
    with FakeHub(tmp_path / "remote"):
        train_translation.main([*translation_args(pairs, tmp_path / "b", tokenizer_dir, *common),
                                "--max_train_steps", "3", "--push_to_hub", "--hub_model_id", "someone/m30k",
                                "--hub_strategy", "checkpoint"])
    hub_cache("someone/m30k", tmp_path / "remote")
    train_translation.main([*translation_args(pairs, tmp_path / "new-machine", tokenizer_dir, *common),
                            "--max_train_steps", "6", "--resume_from_checkpoint", "hub",
                            "--hub_model_id", "someone/m30k"])

    final = {run: tmp_path / run / "checkpoints" / "step_6" for run in ("a", "new-machine")}
    states = {run: json.loads((path / "run_state.json").read_text()) for run, path in final.items()}
    # The new machine has no best model of steps 1-3 on disk: it tracks the best anew from step 3 on.
    for key in ("step", "epoch", "batches_in_epoch", "history", "config"):
        assert states["a"][key] == states["new-machine"][key], key
    weights = {run: load_file(path / "model.safetensors") for run, path in final.items()}
    for name, tensor in weights["a"].items():
        assert torch.equal(tensor, weights["new-machine"][name]), name


def test_resume_reads_the_given_revision(tmp_path, hub_cache):
    for revision, step in (("main", 6), ("v1", 3)):
        (tmp_path / revision / "last-checkpoint").mkdir(parents=True)
        (tmp_path / revision / "last-checkpoint" / "run_state.json").write_text(json.dumps({"step": step}))
        hub_cache("someone/model", tmp_path / revision, revision, commit=f"{step}" * 40)
    checkpoint = download_last_checkpoint("someone/model", "v1", None)
    assert json.loads((checkpoint / "run_state.json").read_text())["step"] == 3
    hub_cache("someone/other", tmp_path / "v1" / "last-checkpoint")
    with pytest.raises(TrainingError, match="someone/other has no last-checkpoint/run_state.json"):
        download_last_checkpoint("someone/other", None, None)
    with pytest.raises(TrainingError, match="cannot download last-checkpoint/ of someone/absent"):
        download_last_checkpoint("someone/absent", None, None)


# ------------------------------------------------------------------------------ image models in timm's format

@pytest.fixture(scope="module")
def image_run(tmp_path_factory, cifar_parquet):  # noqa: F811
    root = tmp_path_factory.mktemp("image")
    with FakeHub(root / "remote") as hub:
        train_image_classification.main(image_args(cifar_parquet, root / "c10", "--skip_recursions", "3",
                                                   "--checkpointing_steps", "2", "--push_to_hub",
                                                   "--hub_model_id", "someone/c10", "--hub_strategy", "every_save"))
    return root / "c10", hub


def test_timm_loads_the_pushed_image_model_from_the_hub(image_run, hub_cache):
    _, hub = image_run
    hub_cache("someone/c10", hub.remote)
    timm_model = timm.create_model("hf-hub:someone/c10", pretrained=True).eval()
    assert timm_model.pretrained_cfg["hf_hub_filename"] == "timm/model.safetensors"
    assert timm.models.get_model_args(timm_model)["skip_recursions"] == 3
    hf_model = AutoModelForImageClassification.from_pretrained("someone/c10", trust_remote_code=True).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(timm_model(images), hf_model(pixel_values=images).logits)


def test_the_local_output_folder_keeps_transformers_format_only(image_run):
    output_dir, _ = image_run
    assert not (output_dir / "timm").exists() and "architecture" not in json.loads(
        (output_dir / "config.json").read_text())


# ----------------------------------------------------------------------------------- pushing a finished run

def test_push_script_names_what_an_incomplete_run_lacks(image_run, tmp_path):
    output_dir, _ = image_run
    incomplete = shutil.copytree(output_dir, tmp_path / "incomplete")
    (incomplete / "model.safetensors").unlink()
    (incomplete / "preprocessor_config.json").unlink()
    with pytest.raises(TrainingError, match="lacks: model.safetensors .*, preprocessor_config.json"):
        push_to_hub.main([str(incomplete), "someone/c10"])


def test_push_script_uploads_a_finished_run(image_run, tmp_path):
    output_dir, _ = image_run
    run = shutil.copytree(output_dir, tmp_path / "run")
    with FakeHub(tmp_path / "remote") as hub:
        push_to_hub.main([str(run), "someone/pushed", "--private", "--revision", "dev", "--create_pr",
                          "--commit_message", "first push"])
    hub.create_repo.assert_called_once_with("someone/pushed", exist_ok=True, private=True)
    (upload,) = hub.uploads
    assert (upload["repo_id"], upload["revision"], upload["create_pr"], upload["commit_message"]) == \
        ("someone/pushed", "dev", True, "first push")
    assert {"checkpoints/*", "best_model/*", "logs/*"} <= set(upload["ignore_patterns"])
    assert {"README.md", "config.json", "model.safetensors", "timm/model.safetensors", "timm/config.json"} <= \
        set(upload["files"])
    assert not [name for name in upload["files"] if name.split("/")[0] in ("checkpoints", "best_model", "logs")]
    assert "someone/pushed" in (run / "README.md").read_text()  # the card, regenerated for the repository


def test_push_script_reports_an_http_error_in_one_line(image_run, tmp_path, capsys):
    output_dir, _ = image_run
    run = shutil.copytree(output_dir, tmp_path / "run")
    with FakeHub(tmp_path / "remote", [http_error(500)]), pytest.raises(SystemExit) as exit_info:
        push_to_hub.run_main(lambda: push_to_hub.main([str(run), "someone/pushed"]))
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.splitlines()[-1] == f"error: cannot upload {run} to someone/pushed: HTTP 500: " \
                                                       "500 Client Error"


def test_push_script_offline_is_one_error_and_rewrites_nothing(image_run, tmp_path, capsys, monkeypatch):
    output_dir, _ = image_run
    run = shutil.copytree(output_dir, tmp_path / "run")
    before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as exit_info:
        push_to_hub.run_main(lambda: push_to_hub.main([str(run), "someone/pushed"]))
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "error: cannot create or write the Hub repository someone/pushed: HF_HUB_OFFLINE " \
                                      "is set, so the Hub cannot be reached\n"
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == before
