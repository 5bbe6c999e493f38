"""Accuracy: the fraction of predictions equal to their reference (hub-free copy)."""
import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy: the fraction of predictions equal to their reference (hub-free copy)."
_KWARGS = """
Args:
    predictions: Class-id predictions.
    references: Class-id ground truth.
Returns:
    accuracy: float.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        return {"accuracy": float((predictions == references).mean())}
