"""`frod <verb> [hydra overrides]`: each verb is its own Hydra application over the packaged
recipes/ tree (config.yaml for train, eval.yaml, merge.yaml).

Exit codes: 0 done; 2 bad input (unknown recipe or option, misspelt key, wrong type, a value the run
cannot use, missing or malformed data or model files), a run directory or output another frod command holds
(frod_cli/runs/lock.py), or a file-system error (no space, quota, read-only, permission: the path and the
cause): one line on stderr, no traceback; 1 a bug in frod: the traceback and one line asking to report it;
130 interrupted. FROD_DEBUG=1 shows the traceback of every error.
"""
from __future__ import annotations

import difflib
import errno
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

USAGE = """\
usage: frod <verb> [group=option ...] [key=value ...] [hydra flags]

Fine-tune Hugging Face models with FRoD (AAAI 2026) or a baseline, from composable recipes.

verbs:
{verbs}
  recipes   list the recipes and the options of every config group

examples:
  frod train                                  # recipe=quickstart: MiniLM + FRoD, Twitter sentiment
  frod train recipe=vit_cifar --cfg job       # show a composed recipe without running it
  frod train method=lora optimizer=adamw      # a baseline on the same recipe
  frod train -m method=frod,lora,full         # a sweep with summary.csv / summary.md / loss_curves.png
  frod train --help                           # config groups and every key of the composed config

Methods: frod, full, lora, dora, pissa, vera, peft_frod.  Docs: README.md, docs/ARCHITECTURE.md.
"""


def verbs() -> Dict[str, Any]:
    """The registered verbs (frod_cli/commands/, one module each)."""
    from frod_cli.commands import discover

    return discover()


def usage() -> str:
    return USAGE.format(verbs="\n".join(f"  {name:<9} {v.summary}" for name, v in verbs().items()))


GROUPS = ("recipe", "model", "task", "method", "optimizer", "debug", "hparams_search")


def recipes_dir() -> str:
    """The recipes/ tree: packaged as frod_cli.recipes when installed, or the checkout's recipes/."""
    try:
        spec = importlib.util.find_spec("frod_cli.recipes")
    except (ImportError, ValueError):
        spec = None
    candidates: List[Path] = []
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) for p in spec.submodule_search_locations]
    candidates.append(Path(__file__).resolve().parent / "recipes")
    candidates.append(Path(__file__).resolve().parent.parent / "recipes")
    for c in candidates:
        if (c / "config.yaml").is_file():
            return str(c.resolve())
    raise FileNotFoundError("the recipes/ directory is missing from the installation")


USER_ERROR_EXIT = 2
BUG_EXIT = 1



# ---------------------------------------------------------------------------------------------
# Errors -> one line
# ---------------------------------------------------------------------------------------------
def _user_error_types() -> Tuple[type, ...]:
    """Refusals of bad input: config composition and validation, and frod's own one-line errors (the
    CLI's FrodCliError, the core's FrodError). Any other exception is a bug and keeps its traceback."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from frod_cli import FrodCliError
    from frod_cli.frod import FrodError

    return (HydraException, OmegaConfBaseException, FrodCliError, FrodError)


# errno values that say the file system refused a write (not that frod did something wrong): one line, exit 2
FILE_SYSTEM_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}
_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)")


def file_system_error(ex: BaseException) -> Optional[str]:
    """'<path>: <cause>' when `ex` (or what it was raised from) is the file system refusing a write, else None.
    safetensors reports an OSError only in its message ('... (os error 28)')."""
    found: List[Tuple[int, Any]] = []  # (errno, file name) along the chain
    seen: List[BaseException] = []
    e: Optional[BaseException] = ex
    while e is not None and e not in seen and len(seen) < 20:
        seen.append(e)
        code = e.errno if isinstance(e, OSError) else None
        if code is None:
            m = _OS_ERROR_CODE.search(str(e))
            code = int(m.group(1)) if m else None
        if code in FILE_SYSTEM_ERRNOS:
            found.append((code, getattr(e, "filename", None)))
        e = e.__cause__ or e.__context__
    if not found:
        return None
    code, where = next((f for f in found if f[1]), found[0])  # the one that names its file, if one does
    return f"file system: {f'{where}: ' if where else ''}{os.strerror(code)} ({errno.errorcode.get(code, code)})"


def _debug() -> bool:
    return os.environ.get("FROD_DEBUG", "") not in ("", "0")


def report_bug(verb: str) -> None:
    import traceback

    traceback.print_exc()
    print(f"frod {verb}: internal error: this is a bug in frod, not in your input; please report it with the "
          "command and the traceback above", file=sys.stderr)


def _suggest(ex: BaseException) -> str:
    """'did you mean ...' for a misspelt key of a structured config."""
    import dataclasses

    key = getattr(ex, "key", None)
    obj = getattr(ex, "object_type", None)
    if not isinstance(key, str) or obj is None or not dataclasses.is_dataclass(obj):
        return ""
    fields = [f.name for f in dataclasses.fields(obj)]
    from frod_cli.methods import CONFIGS

    methods = sorted(n for n, c in CONFIGS.items() if c is obj)
    if methods:  # a key of another method (method=lora method.sparse_rate=...)
        owners = sorted(n for n, c in CONFIGS.items() if key in {f.name for f in dataclasses.fields(c)})
        elsewhere = f" (a key of {', '.join(owners)})" if owners else ""
        return f"; method {'/'.join(methods)} has no key {key!r}{elsewhere}; its keys: {', '.join(fields)}"
    from frod_cli.tasks import TASK_CONFIGS, discover

    discover()
    types = sorted(n for n, c in TASK_CONFIGS.items() if c is obj)
    owners = sorted(n for n, c in TASK_CONFIGS.items() if key in {f.name for f in dataclasses.fields(c)})
    if types and owners:  # a key of another task type (an SFT recipe with task.loss=ipo)
        return (f"; task.{key} is read by task.type={'/'.join(owners)} only; this task is {'/'.join(types)}: drop it, "
                f"or train a {owners[0]} task")
    close = difflib.get_close_matches(key, fields, n=3)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else f"; keys: {', '.join(fields)}"


def one_line(ex: BaseException) -> str:
    """A one-line message for a user error (Hydra/OmegaConf messages span several lines)."""
    from omegaconf.errors import OmegaConfBaseException

    # The innermost formatted OmegaConf error carries the specifics (key, type, full_key).
    chain = [ex]
    while len(chain) < 20:
        nxt = chain[-1].__cause__ or chain[-1].__context__
        if nxt is None or nxt in chain:
            break
        chain.append(nxt)
    good = [e for e in chain if isinstance(e, OmegaConfBaseException) and "$" not in str(e) and str(e).strip()]
    inner: BaseException = good[-1] if good else ex
    text = str(ex)
    if "Available options in" in text or "Could not find" in text:
        lines = text.splitlines()
        head = next((l.strip() for l in lines if "Could not" in l), lines[0].strip())
        opts: List[str] = []
        in_opts = False
        for l in lines:
            if "Available options in" in l:
                in_opts = True
            elif in_opts and l.startswith("\t") and l.strip():
                opts.append(l.strip())
            elif in_opts and opts:
                break
        group = next((l.split("'")[1] for l in lines if "Available options in" in l and "'" in l), None)
        if opts and group:
            return f"{head}; available {group} options: {', '.join(opts)}"
        return head
    src = inner if isinstance(inner, OmegaConfBaseException) else ex
    lines = [l.strip() for l in str(src).strip().splitlines() if l.strip()]
    msg = lines[0] if lines else type(src).__name__
    if msg.endswith(":") and len(lines) > 1:
        msg = f"{msg} {lines[1]}"
    if "Missing mandatory value:" in msg:
        name = msg.split("Missing mandatory value:")[-1].strip()
        return f"missing required value {name!r}: pass {name}=..."
    full_key = getattr(src, "full_key", None)
    if full_key and full_key not in msg:
        msg += f" (key: {full_key})"
    if "not in" in msg or "not found" in msg:
        msg += _suggest(src)
    if isinstance(ex, KeyError) and not isinstance(ex, OmegaConfBaseException):
        msg = f"missing key {msg}"
    return msg


# ---------------------------------------------------------------------------------------------
# Safety: recipes instantiate nothing but the project's own classes
# ---------------------------------------------------------------------------------------------
# `_target_` values a composed config may carry (Hydra's sweeper/launcher plugins, Optuna samplers, our
# sweep callback). Anything else (a recipe naming os.system, say) is refused before Hydra instantiates it.
ALLOWED_TARGET_PREFIXES = ("frod_cli.", "hydra._internal.core_plugins.", "hydra_plugins.", "optuna.samplers.",
                           "optuna.pruners.", "logging.")


def _targets(node: Any, path: str = "") -> List[Tuple[str, str]]:
    out: List[Tuple[str, str]] = []
    if isinstance(node, dict):
        for k, v in node.items():
            p = f"{path}.{k}" if path else str(k)
            if k == "_target_":
                out.append((p, str(v)))
            else:
                out += _targets(v, p)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _targets(v, f"{path}[{i}]")
    return out


def compose_for_checks(verb: str, args: Sequence[str]) -> Any:
    """The config as the verb will compose it, Hydra's part included (sweep overrides dropped), for the checks
    made before Hydra runs; None when it does not compose (Hydra reports that itself)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = [a for a in args if "=" in a and not a.startswith("-")
                 and not any(t in a.split("=", 1)[1] for t in (",", "range(", "choice(", "interval(", "glob("))]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=recipes_dir(), version_base="1.3"):
            return compose(config_name=verbs()[verb].config, overrides=overrides, return_hydra_config=True)
    except Exception:  # noqa: BLE001 - Hydra reports composition errors itself
        return None
    finally:
        GlobalHydra.instance().clear()


def refuse_foreign_targets(args: Sequence[str], composed: Any) -> None:
    """Refuse any `_target_` outside ALLOWED_TARGET_PREFIXES, on the command line or in the composed config."""
    from omegaconf import OmegaConf

    from frod_cli import FrodCliError

    for a in args:
        if "_target_" in a.split("=", 1)[0] and "=" in a:
            value = a.split("=", 1)[1]
            if not value.startswith(ALLOWED_TARGET_PREFIXES):
                raise FrodCliError(f"refused {a!r}: a config may only name the project's own classes (_target_)")
    if composed is None:
        return
    for where, target in _targets(OmegaConf.to_container(composed, resolve=False)):
        if not target.startswith(ALLOWED_TARGET_PREFIXES):
            raise FrodCliError(f"refused {where}={target!r}: recipes may only instantiate the project's own "
                               "classes (registries: method.name, task.type)")


# ---------------------------------------------------------------------------------------------
# Running a verb
# ---------------------------------------------------------------------------------------------
HELP_FLAGS = ("--help", "-h", "--info", "--cfg", "-c", "--hydra-help")


def _task_function(fn: Any, result: Dict[str, Any]) -> Any:
    """The Hydra task function around a verb's `run`: its value, or its error kept for `_report` (a multirun
    lets Hydra see it, to name the failing job's overrides)."""
    user_errors = _user_error_types()

    def task_fn(cfg: Any) -> Any:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        try:
            result["value"] = fn(cfg)
        except Exception as e:  # noqa: BLE001 - a refusal (one line) or a bug (its traceback), reported below
            if HydraConfig.get().mode == RunMode.MULTIRUN or _debug():
                raise
            result["error" if isinstance(e, user_errors) else "bug"] = e
        return result.get("value")

    task_fn.__module__ = __name__
    return task_fn


def _before_hydra(verb: str, args: Sequence[str]) -> Tuple[List[str], Any]:
    """The verb's own rewriting of its command line, then the checks made before Hydra composes and creates
    anything: foreign `_target_`s, and the verb's `check` (frod train: its output directory)."""
    spec = verbs()[verb]
    cleanup = None
    args = list(args)
    if spec.prepare is not None:
        args, cleanup = spec.prepare(args)
        sys.argv = [f"frod {verb}", *args]
    if not any(a in HELP_FLAGS for a in args):
        composed = compose_for_checks(verb, args)
        refuse_foreign_targets(args, composed)
        if spec.check is not None and composed is not None:
            args = spec.check(composed, args)
            sys.argv = [f"frod {verb}", *args]
    return args, cleanup


def _report(verb: str, e: BaseException) -> int:
    """The exit code of a verb that raised `e`, with what it prints: one line for a refusal or a file-system
    error, the traceback for a bug. Called inside the `except` block that caught `e`."""
    if isinstance(e, KeyboardInterrupt):
        print(f"frod {verb}: interrupted", file=sys.stderr)
        return 130
    if _debug():
        raise  # noqa: PLE0704 - re-raises `e`, which is being handled
    if isinstance(e, _user_error_types()):
        print(f"frod {verb}: error: {one_line(e)}", file=sys.stderr)
        return USER_ERROR_EXIT
    disk = file_system_error(e)
    if disk is not None:
        print(f"frod {verb}: error: {disk}", file=sys.stderr)
        return USER_ERROR_EXIT
    report_bug(verb)
    return BUG_EXIT


def run_verb(verb: str, args: Sequence[str]) -> Tuple[int, Any]:
    """Run one verb in-process. Returns (exit code, the task function's return value)."""
    from hydra import main as hydra_main
    from hydra.core.global_hydra import GlobalHydra

    from frod_cli.runs.lock import release_all
    from frod_cli.schemas import register_configs

    register_configs()
    result: Dict[str, Any] = {}
    old_argv, old_env = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach us; we print them as one line
    cleanup = None
    sys.argv = [f"frod {verb}", *args]
    try:
        args, cleanup = _before_hydra(verb, args)
        GlobalHydra.instance().clear()
        hydra_main(version_base="1.3", config_path=recipes_dir(),
                   config_name=verbs()[verb].config)(_task_function(verbs()[verb].run, result))()
        for key in ("error", "bug"):
            if key in result:
                raise result[key]
        return 0, result.get("value")
    except SystemExit as e:  # --help, --cfg, --info
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        return code, result.get("value")
    except BaseException as e:  # noqa: BLE001 - every outcome gets its exit code and its message
        return _report(verb, e), None
    finally:
        release_all()  # the locks of the command (runs/lock.py); the kernel would release them at exit anyway
        sys.argv = old_argv
        if cleanup is not None:
            cleanup()
        if old_env is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = old_env
        GlobalHydra.instance().clear()


def list_recipes() -> str:
    root = Path(recipes_dir())
    out = []
    for group in GROUPS:
        d = root / group
        if not d.is_dir():
            continue
        out.append(f"{group}:")
        for f in sorted(d.rglob("*.yaml")):
            name = f.relative_to(d).with_suffix("").as_posix()
            if any(part.startswith("_") for part in name.split("/")):
                continue  # shared bases, not meant to be picked
            first = ""
            for line in f.read_text(encoding="utf-8").splitlines():
                s = line.strip()
                if s.startswith("#") and "@package" not in s:
                    first = s.lstrip("# ").strip()
                    break
            out.append(f"  {name:<26} {first}")
    return "\n".join(out)


# Library loggers that warn on every run about something the user cannot act on: bitsandbytes' CPU backend (imported
# by PEFT whenever bitsandbytes is installed) looks for an optional kernel on the Hub, offline never there.
QUIET_LOGGERS = ("bitsandbytes.backends.cpu.ops",)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import logging

    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), end="")
        return 0
    if argv[0] in ("-V", "--version"):
        from frod_cli import __version__

        print(f"frod {__version__}")
        return 0
    verb, rest = argv[0], argv[1:]
    if verb == "recipes":
        print(list_recipes())
        return 0
    known = verbs()
    if verb not in known:
        close = difflib.get_close_matches(verb, [*known, "recipes"], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"frod: error: unknown verb {verb!r} ({', '.join(known)}, recipes){hint}", file=sys.stderr)
        return USER_ERROR_EXIT
    if known[verb].direct is not None:
        code = known[verb].direct(rest)
        if code is not None:
            return code
    code, _ = run_verb(verb, rest)
    return code


if __name__ == "__main__":
    sys.exit(main())
