"""frod: fine-tune Hugging Face models with FRoD (AAAI 2026) and compare it with LoRA-family
baselines and full fine-tuning. Entry point: the `frod` command (frod_cli.cli)."""

__version__ = "0.1.0"


class FrodCliError(ValueError):
    """A refusal the user can act on (bad input, missing file). The CLI prints its message as one
    line on stderr and exits non-zero."""


def one_line(error: BaseException, limit: int = 400) -> str:
    """A library's error message as one line: its lines joined (a message cut at its first line can stop
    mid-sentence), whitespace collapsed, at most `limit` characters; the exception's type when it says nothing."""
    text = " ".join(str(error).split())
    if not text:
        return type(error).__name__
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def import_submodules(package: str, path: list, skip: tuple = ("base",)) -> None:
    """Import every module of a registry package (frod_cli.methods, frod_cli.tasks): each registers itself."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(path):
        if info.name not in skip:
            importlib.import_module(f"{package}.{info.name}")
