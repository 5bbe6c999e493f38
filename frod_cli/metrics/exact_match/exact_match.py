"""Exact match: the fraction of predicted strings equal to their reference (hub-free)."""
import string

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Exact match: the fraction of predicted strings equal to their reference (hub-free)."
_KWARGS = """
Args:
    predictions: Predicted strings.
    references: Reference strings.
    ignore_case: Compare lowercased strings (default False).
    ignore_punctuation: Drop ASCII punctuation before comparing (default False).
    strip: Strip surrounding whitespace before comparing (default True).
Returns:
    exact_match: float in [0, 1].
"""


def _prepare(texts, ignore_case, ignore_punctuation, strip):
    out = []
    for t in texts:
        t = "" if t is None else str(t)
        if ignore_case:
            t = t.lower()
        if ignore_punctuation:
            t = t.translate(str.maketrans("", "", string.punctuation))
        if strip:
            t = t.strip()
        out.append(t)
    return np.asarray(out, dtype=object)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, ignore_case=False, ignore_punctuation=False, strip=True):
        p = _prepare(predictions, ignore_case, ignore_punctuation, strip)
        r = _prepare(references, ignore_case, ignore_punctuation, strip)
        if len(p) == 0:
            return {"exact_match": 0.0}
        return {"exact_match": float(np.mean(p == r))}
