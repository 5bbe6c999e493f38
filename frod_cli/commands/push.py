"""`frod push path=<run dir | export dir> repo=<owner>/<name>`: a finished run or a `frod export` output to the
Hugging Face Hub (frod_cli/share/hub.py says what goes up). The file list is printed before anything is sent;
dry_run=true stops there. Refusals (not a run, nothing to upload, a bad repo id, no token, offline) are one line."""
from __future__ import annotations

from typing import Any, Dict

from frod_cli.commands import register_verb


@register_verb("push", config="push",
               summary="a run or export to the Hugging Face Hub:  frod push path=<dir> repo=<owner>/<name>")
def run(cfg: Any) -> Dict[str, Any]:
    from frod_cli.share import hub

    repo = hub.check_repo_id(cfg.repo)
    plan = hub.plan_upload(str(cfg.path), repo, upload=str(cfg.upload),
                           include_checkpoints=bool(cfg.include_checkpoints), keep_card=bool(cfg.keep_card))
    print(hub.describe(plan, repo, cfg.revision, bool(cfg.private)))
    if cfg.dry_run:
        print("dry run: nothing was uploaded")
        return {"repo": repo, "files": plan.files, "uploaded": False}
    url = hub.upload(plan, repo, bool(cfg.private), cfg.revision)
    print(f"pushed to {url}")
    return {"repo": repo, "files": plan.files, "uploaded": True, "commit": url}
