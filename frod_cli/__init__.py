"""frod: fine-tune Hugging Face models with FRoD (AAAI 2026) and compare it with LoRA-family
baselines and full fine-tuning. Entry point: the `frod` command (frod_cli.cli)."""

__version__ = "0.1.0"


class FrodCliError(ValueError):
    """A refusal the user can act on (bad input, missing file). The CLI prints its message as one
    line on stderr and exits non-zero."""
