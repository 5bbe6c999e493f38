"""Uploads to the Hugging Face Hub (`frod push`, `train.push_to_hub`), with huggingface_hub's create_repo,
create_branch and upload_folder. What goes up is chosen by the directory's layout and staged as links in a
temporary directory: nothing is copied into, written into or removed from the run.

    a run      merged/ (or adapter/: upload=adapter, or a run without merged/) at the repo's root, with a model card
               written for the repo (card.py: the run's results at this moment, loading by repo id), and run/:
               metrics.json, eval.json, harness.json, merge.json, loss.png (those it has), config.yaml (the config
               as it ran) and overrides.yaml; run/checkpoints/ only with include_checkpoints=true
    an export  its files (the adapter or model, export.json) and a card written for the repo

Never uploaded: checkpoints/ (unless asked), trackers/, train.log, predictions.jsonl (your data's text), hidden
files (atomic writes' temporaries). keep_card=true uploads the directory's own README.md instead of a fresh card."""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, Optional

from frod_cli import FrodCliError, one_line

log = logging.getLogger("frod.push")
UPLOADS = ("auto", "merged", "adapter")
# run file -> its path in the repo
RUN_FILES = {"metrics.json": "run/metrics.json", "eval.json": "run/eval.json", "harness.json": "run/harness.json",
             "merge.json": "run/merge.json", "loss.png": "run/loss.png", ".hydra/config.yaml": "run/config.yaml",
             ".hydra/overrides.yaml": "run/overrides.yaml"}
EXPORT_JSON = "export.json"


@dataclass
class Plan:
    """What one push sends: `files` maps each path in the repo to the local file it comes from; `card` is the
    model card written for the upload (None: the directory's own README.md is among the files, or there is none)."""

    source: str  # the directory given
    kind: str  # merged | adapter | export
    run_dir: Optional[str]
    files: Dict[str, str]
    card: Any = None
    note: str = ""  # how the card was chosen


# ---- refusals -------------------------------------------------------------------------------------------------
def check_repo_id(repo: Any, key: str = "repo") -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo = "" if repo is None else str(repo)
    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise FrodCliError(f"{key}={repo!r} is not a Hub repo id (<owner>/<name>: letters, digits, '-', '_', '.'): "
                           f"{one_line(e)}") from None
    return repo


def check_online(key: str = "") -> None:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise FrodCliError(f"{key}{': ' if key else ''}HF_HUB_OFFLINE=1 is set (offline mode), so nothing can be "
                           "pushed: unset it")


def hub_token(key: str = "") -> str:
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise FrodCliError(f"{key}{': ' if key else ''}no Hugging Face token: log in with `hf auth login` or set "
                           "HF_TOKEN (a token with write access)")
    return token


def check_push_settings(tc: Any) -> None:
    """train.push_to_hub and its keys, before any training: a valid repo id, online, a token, not a sweep."""
    repo = tc.get("push_to_hub")
    if not repo:
        for key, unset in (("hub_private", False), ("hub_revision", None)):
            if tc.get(key, unset) != unset:
                raise FrodCliError(f"train.{key} is for train.push_to_hub, which is not set")
        return
    check_repo_id(repo, "train.push_to_hub")
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise FrodCliError("train.push_to_hub in a sweep would push every job to one repo: push the run you choose "
                           "with `frod push path=<run dir> repo=...`")
    hub_token("train.push_to_hub")
    check_online("train.push_to_hub")


# ---- what goes up ---------------------------------------------------------------------------------------------
def resolve(path: str, upload: str):
    """(kind, run dir or None, the directory whose files go to the repo's root) of what `path` names."""
    from frod_cli.runs import is_run_dir

    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise FrodCliError(f"path {path}: no such directory")
    if upload not in UPLOADS:
        raise FrodCliError(f"upload must be one of {', '.join(UPLOADS)}, got {upload!r}")
    name, parent = os.path.basename(path), os.path.dirname(path)
    if not is_run_dir(path) and name in ("merged", "adapter") and is_run_dir(parent):
        if upload not in ("auto", name):
            raise FrodCliError(f"path names the run's {name}/ and upload={upload}: name the run directory instead")
        path, upload = parent, name
    if is_run_dir(path):
        return run_kind(path, upload)
    if os.path.isfile(os.path.join(path, EXPORT_JSON)):
        if upload != "auto":
            raise FrodCliError(f"upload={upload} chooses a run's merged/ or adapter/; an export ({path}) goes up whole")
        return "export", None, path
    raise FrodCliError(f"{path} is not a run directory (no .hydra/config.yaml), a run's merged/ or adapter/, nor a "
                       f"frod export (no {EXPORT_JSON})")


def has_files(directory: str) -> bool:
    return os.path.isdir(directory) and any(not n.startswith(".") for n in os.listdir(directory))


def run_kind(run_dir: str, upload: str):
    from frod_cli.runs import RunPaths

    paths = RunPaths.of(run_dir)
    if not paths.metrics.is_file():
        raise FrodCliError(f"run {run_dir} has not finished (no metrics.json): nothing to push yet")
    have = [k for k in ("merged", "adapter") if has_files(str(paths.root / k))]
    if not have:
        raise FrodCliError(f"run {run_dir} has nothing to upload: neither merged/ nor adapter/ (train.save_merged and "
                           "train.save_adapter were off)")
    kind = have[0] if upload == "auto" else upload
    if kind not in have:
        hint = " (`frod merge run=<run dir>` writes it)" if kind == "merged" else ""
        raise FrodCliError(f"upload={upload}: run {run_dir} has no {kind}/{hint}")
    return kind, run_dir, str(paths.root / kind)


def files_under(directory: str, prefix: str = "") -> Dict[str, str]:
    """path in the repo -> file, for every file under `directory` (hidden files and the card left out)."""
    out = {}
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for n in sorted(names):
            rel = os.path.relpath(os.path.join(root, n), directory).replace(os.sep, "/")
            if not n.startswith(".") and not (rel == "README.md" and not prefix):
                out[prefix + rel] = os.path.join(root, n)
    return out


def plan_upload(path: str, repo: str, upload: str = "auto", include_checkpoints: bool = False,
                keep_card: bool = False) -> Plan:
    """Everything a push of `path` to `repo` sends, decided before anything is sent."""
    kind, run_dir, top = resolve(path, upload)
    files = files_under(top)
    if run_dir is not None:
        files.update({dest: os.path.join(run_dir, src) for src, dest in RUN_FILES.items()
                      if os.path.isfile(os.path.join(run_dir, src))})
        checkpoints = os.path.join(run_dir, "checkpoints")
        if include_checkpoints:
            if not has_files(checkpoints):
                raise FrodCliError(f"include_checkpoints=true: run {run_dir} kept no checkpoints "
                                   "(train.keep_checkpoints=true keeps them)")
            files.update(files_under(checkpoints, "run/checkpoints/"))
    elif include_checkpoints:
        raise FrodCliError("include_checkpoints=true is for a run directory; an export has no checkpoints")
    plan = Plan(os.path.abspath(path), kind, run_dir, files)
    choose_card(plan, top, repo, keep_card)
    return plan


def choose_card(plan: Plan, top: str, repo: str, keep_card: bool) -> None:
    """A card written for `repo` from what the run holds now, or (keep_card) the directory's own README.md."""
    from frod_cli.runs import is_run_dir
    from frod_cli.share import card as C

    own = os.path.join(top, C.CARD)
    if keep_card:
        if not os.path.isfile(own):
            raise FrodCliError(f"keep_card=true: {top} has no {C.CARD}")
        plan.files[C.CARD], plan.note = own, "the directory's own card, as it is (keep_card=true)"
        return
    if plan.kind != "export":
        plan.card, plan.note = C.build_card(C.run_artifact(plan.run_dir, plan.kind, model_id=repo)), f"written for {repo}"
        return
    report = C.read_json(os.path.join(top, EXPORT_JSON)) or {}
    if report.get("run") and is_run_dir(str(report["run"])):
        plan.card = C.build_card(C.export_artifact(top, report, model_id=repo))
        plan.note = f"written for {repo}"
    elif os.path.isfile(own):
        plan.files[C.CARD] = own
        plan.note = f"the export's own card: its run ({report.get('run')}) is gone, so none is written afresh"
    else:
        plan.note = f"none: the export has no card and its run ({report.get('run')}) is gone"


def size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def describe(plan: Plan, repo: str, revision: Optional[str], private: bool) -> str:
    """The plan as printed: every path in the repo, its size and where it comes from."""
    sizes = {dest: os.path.getsize(src) for dest, src in plan.files.items()}
    card_text = str(plan.card) if plan.card is not None else None
    total = sum(sizes.values()) + (len(card_text.encode()) if card_text else 0)
    count = len(sizes) + (card_text is not None)
    lines = [f"{plan.source} ({plan.kind}): {count} files, {size(total)} -> {repo} "
             f"(branch {revision or 'main'}{', private if new' if private else ''}); model card: {plan.note}"]
    width = max([len(d) for d in sizes] + [9])
    if card_text is not None:
        lines.append(f"  {'README.md':<{width}} {size(len(card_text.encode())):>9}  model card {plan.note}")
    lines += [f"  {d:<{width}} {size(sizes[d]):>9}  {plan.files[d]}" for d in sorted(sizes)]
    return "\n".join(lines)


def stage(plan: Plan, folder: str) -> None:
    """The repo's tree in `folder`: a link per file (nothing copied) and the card written for the upload."""
    for dest, src in plan.files.items():
        target = os.path.join(folder, *dest.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.symlink(os.path.abspath(src), target)
    if plan.card is not None:
        plan.card.save(os.path.join(folder, "README.md"))


def failure(error: BaseException) -> str:
    """Why an upload failed, in one line."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(error, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE=1 is set (offline mode): unset it to push"
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, HfHubHTTPError) and status in (401, 403):
        return f"the Hub refused the token ({status}): it needs write access to the repo ({one_line(error)})"
    if isinstance(error, HfHubHTTPError):
        return f"the Hub answered {status}: {one_line(error)}"
    return f"the Hub cannot be reached ({type(error).__name__}: {one_line(error)})"


def upload(plan: Plan, repo: str, private: bool, revision: Optional[str], key: str = "") -> str:
    """create_repo (exist_ok), create_branch (a revision), upload_folder; the commit's URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HTTPError

    token = hub_token(key)
    check_online(key)
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="frod-push-") as folder:
        stage(plan, folder)
        try:
            api.create_repo(repo, private=private, exist_ok=True)
            if revision:
                api.create_branch(repo, branch=revision, exist_ok=True)
            info = api.upload_folder(repo_id=repo, folder_path=folder, revision=revision,
                                     commit_message=f"frod push: {os.path.basename(plan.source)} ({plan.kind})")
        except (OSError, HTTPError) as e:
            raise FrodCliError(f"{key}{': ' if key else ''}the push to {repo} failed: {failure(e)}; nothing was "
                               "changed here") from e
    return str(getattr(info, "commit_url", info))


def push_finished_run(run_dir: str, tc: Any) -> str:
    """train.push_to_hub: the finished run, as `frod push path=<run dir> repo=<repo>` sends it."""
    repo = str(tc.push_to_hub)
    plan = plan_upload(run_dir, repo)
    print(describe(plan, repo, tc.hub_revision, bool(tc.hub_private)))
    try:
        url = upload(plan, repo, bool(tc.hub_private), tc.hub_revision, key="train.push_to_hub")
    except FrodCliError as e:
        raise FrodCliError(f"the run finished in {run_dir}, but {e}; push it again with "
                           f"`frod push path={run_dir} repo={repo}`") from e
    print(f"pushed {run_dir} to {url}")
    return url
