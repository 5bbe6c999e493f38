"""Run directories: the one reader (reader.py), atomic writes (io.py) and plots (plots.py)."""
from frod_cli.runs.io import (JsonlWriter, atomic_dir, atomic_write_json, atomic_write_text, read_jsonl,
                              recover_atomic_dir)
from frod_cli.runs.reader import (RunPaths, find_runs, is_run_dir, load_run_config, loss_series, read_config,
                                  read_log, read_metrics, read_overrides, read_run, training_rows)

__all__ = ["JsonlWriter", "RunPaths", "atomic_dir", "atomic_write_json", "atomic_write_text", "find_runs",
           "is_run_dir", "load_run_config", "loss_series", "read_config", "read_jsonl", "read_log", "read_metrics",
           "read_overrides", "read_run", "recover_atomic_dir", "training_rows"]
