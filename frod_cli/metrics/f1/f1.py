"""F1 score (sklearn f1_score): average binary (pos_label 1), macro, micro or weighted."""
import datasets
import evaluate
from sklearn.metrics import f1_score

_DESCRIPTION = "F1 score (sklearn f1_score): average binary (pos_label 1), macro, micro or weighted."
_KWARGS = """
Args:
    predictions: Class-id predictions.
    references: Class-id ground truth.
Returns:
    f1: float.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, average="binary", pos_label=1):
        return {"f1": float(f1_score(references, predictions, average=average, pos_label=pos_label, zero_division=0))}
