"""Spearman rank correlation coefficient (scipy.stats.spearmanr), an STS-B metric."""
import datasets
import evaluate
import numpy as np
from scipy.stats import spearmanr

_DESCRIPTION = "Spearman rank correlation coefficient (scipy.stats.spearmanr), an STS-B metric."
_KWARGS = """
Args:
    predictions: Real-valued predictions.
    references: Real-valued ground truth.
Returns:
    spearmanr: float.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Spearmanr(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}
            ),
        )

    def _compute(self, predictions, references):
        predictions = np.asarray(predictions, dtype=np.float64)
        references = np.asarray(references, dtype=np.float64)
        # Undefined for a constant input; 0 for the same reason as in pearsonr.
        if predictions.std() == 0 or references.std() == 0:
            return {"spearmanr": 0.0}
        return {"spearmanr": float(spearmanr(references, predictions)[0])}
