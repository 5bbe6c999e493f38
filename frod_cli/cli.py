"""`frod <verb> [hydra overrides]`: each verb is its own Hydra application over the packaged
recipes/ tree (config.yaml for train, eval.yaml, merge.yaml).

Exit codes: 0 done; 2 bad input (unknown recipe or option, misspelt key, wrong type, a value the run
cannot use, missing or malformed data or model files): one line on stderr, no traceback; 1 a bug in frod:
the traceback and one line asking to report it; 130 interrupted. FROD_DEBUG=1 shows the traceback of
every error.
"""
from __future__ import annotations

import difflib
import importlib.util
import os
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


def refuse_foreign_targets(verb: str, args: Sequence[str]) -> None:
    """Compose the config (with Hydra's own part) as the verb will, and refuse any `_target_` outside
    ALLOWED_TARGET_PREFIXES. Sweep overrides are dropped for this check; a composition error is left to
    Hydra to report."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from frod_cli import FrodCliError

    for a in args:
        if "_target_" in a.split("=", 1)[0] and "=" in a:
            value = a.split("=", 1)[1]
            if not value.startswith(ALLOWED_TARGET_PREFIXES):
                raise FrodCliError(f"refused {a!r}: a config may only name the project's own classes (_target_)")
    overrides = [a for a in args if "=" in a and not a.startswith("-")
                 and not any(t in a.split("=", 1)[1] for t in (",", "range(", "choice(", "interval(", "glob("))]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=recipes_dir(), version_base="1.3"):
            cfg = compose(config_name=verbs()[verb].config, overrides=overrides, return_hydra_config=True)
            tree = OmegaConf.to_container(cfg, resolve=False)
    except Exception:  # noqa: BLE001 - Hydra reports composition errors itself
        return
    finally:
        GlobalHydra.instance().clear()
    for where, target in _targets(tree):
        if not target.startswith(ALLOWED_TARGET_PREFIXES):
            raise FrodCliError(f"refused {where}={target!r}: recipes may only instantiate the project's own "
                               "classes (registries: method.name, task.type)")


# ---------------------------------------------------------------------------------------------
# Running a verb
# ---------------------------------------------------------------------------------------------
def run_verb(verb: str, args: Sequence[str]) -> Tuple[int, Any]:
    """Run one verb in-process. Returns (exit code, the task function's return value)."""
    from hydra import main as hydra_main
    from hydra.core.global_hydra import GlobalHydra

    from frod_cli.schemas import register_configs

    register_configs()
    spec = verbs()[verb]
    config_name, fn = spec.config, spec.run
    result: Dict[str, Any] = {}

    user_errors = _user_error_types()

    def task_fn(cfg: Any) -> Any:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        try:
            result["value"] = fn(cfg)
        except user_errors as e:
            if HydraConfig.get().mode == RunMode.MULTIRUN or _debug():
                raise  # Hydra names the failing job's overrides
            result["error"] = e  # reported as one line below, without Hydra's job banner
        except Exception as e:  # noqa: BLE001 - a bug: reported with its traceback below
            if HydraConfig.get().mode == RunMode.MULTIRUN or _debug():
                raise
            result["bug"] = e
        return result.get("value")

    task_fn.__module__ = __name__
    old_argv, old_env = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach us; we print them as one line
    cleanup = None
    sys.argv = [f"frod {verb}", *args]
    try:
        if spec.prepare is not None:
            args, cleanup = spec.prepare(args)
            sys.argv = [f"frod {verb}", *args]
        if not any(a in ("--help", "-h", "--info", "--cfg", "-c", "--hydra-help") for a in args):
            refuse_foreign_targets(verb, args)
        GlobalHydra.instance().clear()
        hydra_main(version_base="1.3", config_path=recipes_dir(), config_name=config_name)(task_fn)()
        if "error" in result:
            raise result["error"]
        if "bug" in result:
            raise result["bug"]
        return 0, result.get("value")
    except SystemExit as e:  # --help, --cfg, --info
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        return code, result.get("value")
    except KeyboardInterrupt:
        print(f"frod {verb}: interrupted", file=sys.stderr)
        return 130, None
    except user_errors as e:
        if _debug():
            raise
        print(f"frod {verb}: error: {one_line(e)}", file=sys.stderr)
        return USER_ERROR_EXIT, None
    except Exception:  # noqa: BLE001 - a bug in frod: its traceback, and how to report it
        if _debug():
            raise
        report_bug(verb)
        return BUG_EXIT, None
    finally:
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
