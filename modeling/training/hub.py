"""The Hugging Face Hub side of a run: checking at start-up that a push can work, uploading during training in the
background, resuming from the Hub's `last-checkpoint/`, and pushing a finished run.

`--hub_strategy` means what transformers' `TrainingArguments.hub_strategy` means:

- `end`: the output folder (the best model, its card and results) is uploaded once, when training ends.
- `every_save`: also, at every checkpoint, the best model so far with its card and results.
- `checkpoint`: also the latest checkpoint, the full training state, in `last-checkpoint/` (`--resume_from_checkpoint
  hub` continues from it on any machine).
- `all_checkpoints`: also every checkpoint, in `checkpoints/step_<N>/`.

What is uploaded is first copied (hard links where possible) into a temporary folder, so that training may go on
replacing its files; the uploads run one after the other on one `HfApi`'s single-worker executor (`run_as_future`).
A failed upload is logged in one line and retried at the next checkpoint; it never stops training.

Image models are also uploaded in timm's own format: `timm/` holds `timm.models.save_for_hf`'s folder, and the root
config.json, which transformers reads, gets timm's keys too (`architecture`, `model_args` with the skip options,
`pretrained_cfg` whose `hf_hub_filename` points at `timm/model.safetensors`), so that after `import rskip`,
`timm.create_model("hf-hub:user/name", pretrained=True)` loads the same network.
"""

import dataclasses
import json
import os
import shutil
import tempfile
from concurrent.futures import Future
from pathlib import Path

import httpx2
from huggingface_hub import HfApi, get_token, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
from huggingface_hub.utils import filter_repo_objects, validate_repo_id

from .checkpoints import BEST_MODEL, CHECKPOINTS, RUN_STATE, checkpoint_problem
from .errors import TrainingError
from .model_card import read_run, write_model_card

# Uploads leave out the training state, the trackers' logs and unfinished folders.
IGNORED_BY_HUB = [f"{CHECKPOINTS}/*", f"{BEST_MODEL}/*", "logs/*", ".tmp-*", ".old-*"]
HUB_STRATEGIES = ("end", "every_save", "checkpoint", "all_checkpoints")
LAST_CHECKPOINT = "last-checkpoint"
TIMM_FOLDER = "timm"
# The keys of timm's config.json that go into the root config.json beside transformers' own.
TIMM_CONFIG_KEYS = ("architecture", "num_classes", "num_features", "global_pool", "model_args", "pretrained_cfg")
HUB_ERRORS = (HfHubHTTPError, OfflineModeIsEnabled, httpx2.HTTPError, ConnectionError, TimeoutError)


def hub_token(token: str | None) -> str | None:
    """`--hub_token`, else the environment's or `hf auth login`'s token."""
    return token or get_token()


def describe_hub_error(error: Exception) -> str:
    """One line on why a Hub request failed."""
    if isinstance(error, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set, so the Hub cannot be reached"
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        status = error.response.status_code
        if status == 401:
            return "the Hub rejected the token (HTTP 401: invalid or expired)"
        if status == 403:
            return "the token may not create or write this repository (HTTP 403: it needs write access)"
        return f"HTTP {status}: {str(error).splitlines()[0]}"
    if isinstance(error, (httpx2.HTTPError, ConnectionError, TimeoutError)):
        return f"the Hub is unreachable ({type(error).__name__}: {error})"
    return f"{type(error).__name__}: {error}"


def check_hub_access(repo_id: str, token: str | None, private: bool | None = None) -> str:
    """Fail early, with a `TrainingError` saying which, unless a token is available, `repo_id` is valid and the
    repository can be created (or exists) and written. Returns the repository's URL."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise TrainingError(f"--hub_model_id {repo_id!r} is not a valid Hub repository id: {error}") from error
    if token is None:
        raise TrainingError("pushing to the Hub needs a token: pass --hub_token, set HF_TOKEN, or run `hf auth login`")
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, exist_ok=True, private=private)
        api.auth_check(repo_id, write=True)
    except HUB_ERRORS as error:
        raise TrainingError(f"cannot create or write the Hub repository {repo_id}: {describe_hub_error(error)}") \
            from error
    return str(url)


def stage(folder: Path, ignore_patterns: list[str] | None = None) -> Path:
    """A temporary copy of `folder` without `ignore_patterns`, in hard links where the file system allows (the
    training replaces files by renaming, so a link keeps the uploaded version), for an upload in the background. An
    image model's copy also gets timm's format (`add_timm_format`)."""
    staged = Path(tempfile.mkdtemp(prefix="rskip-hub-"))
    files = [path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()]
    for name in filter_repo_objects(files, ignore_patterns=ignore_patterns):
        (staged / name).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(folder / name, staged / name)
        except OSError:
            shutil.copy2(folder / name, staged / name)
    add_timm_format(staged)
    return staged


def add_timm_format(folder: Path) -> None:
    """Add timm's format to an RSkipResNet folder (other folders are left as they are): `timm/` (`save_for_hf`), and
    timm's keys in the root config.json, its weights read from `timm/model.safetensors` (the root's belong to
    transformers, under `timm_model.`)."""
    config_path = folder / "config.json"
    if not config_path.is_file() or json.loads(config_path.read_text()).get("model_type") != "rskip_resnet":
        return
    import timm

    from ..modeling_rskip_resnet import RSkipResNetForImageClassification

    model = RSkipResNetForImageClassification.from_pretrained(folder)
    timm.models.save_for_hf(model.timm_model, folder / TIMM_FOLDER, safe_serialization=True)
    timm_config = json.loads((folder / TIMM_FOLDER / "config.json").read_text())
    timm_config["pretrained_cfg"]["hf_hub_filename"] = f"{TIMM_FOLDER}/model.safetensors"
    timm_config["pretrained_cfg"]["label_names"] = [model.config.id2label[index]
                                                    for index in range(model.config.num_labels)]
    config = json.loads(config_path.read_text())
    config_path.unlink()  # a hard link to the run's own file: write a new one
    config_path.write_text(json.dumps({**config, **{key: timm_config[key] for key in TIMM_CONFIG_KEYS}}, indent=2))


@dataclasses.dataclass
class Upload:
    """One `upload_folder` call: a staged folder to `path_in_repo`, replacing what was there (`delete_patterns`)."""

    folder: Path
    path_in_repo: str
    commit_message: str
    ignore_patterns: list[str]
    delete_patterns: list[str] | None = None


class HubUploads:
    """The uploads of one run to `repo_id` as `strategy` says, in order and in the background; only the main process
    has one. `log` prints a line."""

    def __init__(self, repo_id: str, token: str, strategy: str, ignore_patterns: list[str], log=print):
        self.repo_id, self.strategy, self.ignore_patterns, self.log = repo_id, strategy, ignore_patterns, log
        self.api = HfApi(token=token)
        self.pending: list[tuple[Upload, Future]] = []
        self.failed: dict[str, Upload] = {}  # by path_in_repo: a later upload there replaces a failed one

    def checkpoint_saved(self, checkpoint: Path, step: int, scores: str, write_best_model=None) -> None:
        """Queue what `strategy` uploads at the checkpoint of `step` (`scores`, for the commit messages);
        `write_best_model(folder)` writes the best model so far, with its card and results, into a folder (None while
        there is none). Failed uploads since the last checkpoint are retried first."""
        self.collect_failures()
        uploads = []
        if self.strategy != "end" and write_best_model is not None:
            folder = Path(tempfile.mkdtemp(prefix="rskip-hub-"))
            write_best_model(folder)
            add_timm_format(folder)
            uploads.append(Upload(folder, ".", f"Step {step}: best model so far, {scores}", self.ignore_patterns))
        if self.strategy in ("checkpoint", "all_checkpoints"):
            uploads.append(Upload(stage(checkpoint, [".tmp-*", ".old-*"]), LAST_CHECKPOINT,
                                  f"Step {step}: training state in {LAST_CHECKPOINT}/, {scores}", [], ["*"]))
        if self.strategy == "all_checkpoints":
            uploads.append(Upload(stage(checkpoint, [".tmp-*", ".old-*"]), f"{CHECKPOINTS}/{checkpoint.name}",
                                  f"Step {step}: checkpoint {CHECKPOINTS}/{checkpoint.name}, {scores}", []))
        self.submit(uploads)

    def training_ended(self, output_dir: Path, step: int, scores: str) -> str | None:
        """Upload the finished output folder, retry what failed, and wait for every upload (saying so). Returns what
        failed, with the command that completes the upload, or None."""
        self.collect_failures()
        self.submit([Upload(stage(output_dir, self.ignore_patterns), ".",
                            f"End of training, step {step}: best model, {scores}", self.ignore_patterns)])
        self.log(f"Waiting for {len(self.pending)} upload{'s' if len(self.pending) > 1 else ''} to the Hub "
                 f"({self.repo_id}) to finish")
        for _, future in self.pending:
            future.exception()
        failed = self.collect_failures()
        for upload in self.failed.values():
            shutil.rmtree(upload.folder, ignore_errors=True)
        self.failed.clear()
        if failed:
            return (f"the run finished, but {len(failed)} upload(s) to {self.repo_id} failed; the output folder is "
                    f"complete: push it with `rskip-push-to-hub {output_dir} {self.repo_id}`")
        return None

    def submit(self, uploads: list[Upload]) -> None:
        for upload in uploads:
            superseded = self.failed.pop(upload.path_in_repo, None)
            if superseded is not None:
                shutil.rmtree(superseded.folder, ignore_errors=True)
        for upload in [*self.failed.values(), *uploads]:
            future = self.api.run_as_future(
                self.api.upload_folder, repo_id=self.repo_id, folder_path=str(upload.folder),
                path_in_repo=upload.path_in_repo, commit_message=upload.commit_message,
                ignore_patterns=upload.ignore_patterns, delete_patterns=upload.delete_patterns)
            self.pending.append((upload, future))
        self.failed.clear()

    def collect_failures(self) -> list[Upload]:
        """Take the finished uploads off the queue: a success's staged folder is removed; a failure is logged in one
        line and kept, to be retried."""
        failed, still_pending = [], []
        for upload, future in self.pending:
            if not future.done():
                still_pending.append((upload, future))
            elif future.exception() is None:
                shutil.rmtree(upload.folder, ignore_errors=True)
            else:
                self.log(f"Upload to the Hub failed ({upload.commit_message}): "
                         f"{describe_hub_error(future.exception())}; retried at the next checkpoint")
                self.failed[upload.path_in_repo] = upload
                failed.append(upload)
        self.pending = still_pending
        return failed


def start_hub_uploads(repo_id: str, token: str | None, strategy: str, ignore_patterns: list[str],
                      log=print) -> HubUploads:
    """Check that the push can work (`check_hub_access`), then return the run's `HubUploads`."""
    token = hub_token(token)
    check_hub_access(repo_id, token)
    return HubUploads(repo_id, token, strategy, ignore_patterns, log)


def resolve_hub_checkpoint(resume_from: str | None, repo_id: str, token: str | None) -> str | None:
    """`--resume_from_checkpoint` with `hub` or `hub@<revision>` replaced by the downloaded `last-checkpoint/` of
    `repo_id`, checked; any other value as it is (`rskip.training.checkpoints.find_checkpoint` resolves those)."""
    if not resume_from or not (resume_from == "hub" or resume_from.startswith("hub@")):
        return resume_from
    path = download_last_checkpoint(repo_id, resume_from.partition("@")[2] or None, token)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise TrainingError(f"--resume_from_checkpoint {resume_from}: the Hub's {LAST_CHECKPOINT}/ cannot be resumed "
                            f"from: {problem}")
    return str(path)


def download_last_checkpoint(repo_id: str, revision: str | None, token: str | None) -> Path:
    """`last-checkpoint/` of the Hub repository `repo_id` at `revision`, through the Hugging Face cache."""
    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        snapshot = snapshot_download(repo_id, revision=revision, allow_patterns=[f"{LAST_CHECKPOINT}/*"],
                                     token=hub_token(token))
    except (*HUB_ERRORS, FileNotFoundError) as error:
        raise TrainingError(f"--resume_from_checkpoint hub: cannot download {LAST_CHECKPOINT}/ of {where}: "
                            f"{describe_hub_error(error)}") from error
    checkpoint = Path(snapshot) / LAST_CHECKPOINT
    if not (checkpoint / RUN_STATE).is_file():
        raise TrainingError(f"--resume_from_checkpoint hub: {where} has no {LAST_CHECKPOINT}/{RUN_STATE}; runs push "
                            f"their training state there with --hub_strategy checkpoint or all_checkpoints")
    return checkpoint


def missing_from_run(run_dir: Path) -> list[str]:
    """What a finished run's output folder lacks to be pushed: results, config, weights, the task's processor."""
    missing = [name for name in ("results.json", "config.json") if not (run_dir / name).is_file()]
    if not ((run_dir / "model.safetensors").is_file() or (run_dir / "model.safetensors.index.json").is_file()):
        missing.append("model.safetensors (the best model's weights)")
    if (run_dir / "config.json").is_file():
        model_type = json.loads((run_dir / "config.json").read_text()).get("model_type")
        processor = {"rskip_marian": "tokenizer_config.json", "rskip_resnet": "preprocessor_config.json"}.get(model_type)
        if processor and not (run_dir / processor).is_file():
            missing.append(processor)
    return missing


def push_finished_run(run_dir: str | Path, repo_id: str, token: str | None = None, private: bool | None = None,
                      revision: str | None = None, create_pr: bool = False,
                      commit_message: str | None = None) -> str:
    """Push a finished run's output folder to `repo_id`: check it is complete and that the Hub can take it (the repo
    id, a token, not offline, write access), only then regenerate its model card from its results (named after
    `repo_id`), and upload. Returns the commit's URL (or the PR's)."""
    run_dir = Path(run_dir)
    missing = missing_from_run(run_dir)
    if missing:
        raise TrainingError(f"{run_dir} is not a complete training run's output folder; it lacks: {', '.join(missing)}")
    results, _ = read_run(run_dir)
    token = hub_token(token)
    check_hub_access(repo_id, token, private=private)
    write_model_card(run_dir, repo_id=repo_id)
    api = HfApi(token=token)
    ignore_patterns = [*IGNORED_BY_HUB, *(["tokenizer/*"] if (run_dir / "tokenizer").is_dir() else [])]
    staged = stage(run_dir, ignore_patterns)
    try:
        if revision and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=str(staged), ignore_patterns=ignore_patterns, revision=revision,
            create_pr=create_pr, commit_message=commit_message or f"Upload the finished run {run_dir.name} (best "
                                                                  f"model of step {results['best_step']})")
    except HUB_ERRORS as error:
        raise TrainingError(f"cannot upload {run_dir} to {repo_id}: {describe_hub_error(error)}") from error
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return str(getattr(commit, "pr_url", None) or commit)


__all__ = [
    "IGNORED_BY_HUB",
    "HUB_STRATEGIES",
    "LAST_CHECKPOINT",
    "hub_token",
    "resolve_hub_checkpoint",
    "describe_hub_error",
    "check_hub_access",
    "stage",
    "add_timm_format",
    "HubUploads",
    "start_hub_uploads",
    "download_last_checkpoint",
    "missing_from_run",
    "push_finished_run",
]
