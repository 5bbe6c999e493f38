"""The shipped evaluate modules against hand values and scipy/sklearn."""
import ast
import math

import numpy as np
import pytest
import scipy.stats
from sklearn.metrics import f1_score, matthews_corrcoef

from frod_cli import metrics


def test_accuracy_known_inputs():
    assert metrics.compute(["accuracy"], [0, 1, 2, 2], [0, 1, 1, 2]) == {"accuracy": 0.75}


def test_cola_matthews_correlation_by_hand_and_sklearn():
    # TP=3, TN=2, FP=1, FN=2 -> (3*2 - 1*2) / sqrt(4*5*3*4)
    refs = [1, 1, 1, 1, 1, 0, 0, 0]
    preds = [1, 1, 1, 0, 0, 0, 0, 1]
    hand = (3 * 2 - 1 * 2) / math.sqrt((3 + 1) * (3 + 2) * (2 + 1) * (2 + 2))
    got = metrics.compute(["matthews_correlation"], preds, refs)["matthews_correlation"]
    assert got == pytest.approx(hand) and got == pytest.approx(matthews_corrcoef(refs, preds))
    assert metrics.compute(["mcc"], [1] * 8, refs) == {"matthews_correlation": 0.0}  # degenerate: sklearn's 0


def test_stsb_pearson_spearman_match_scipy():
    rng = np.random.default_rng(0)
    refs = rng.uniform(0, 5, 200)
    preds = refs + rng.normal(0, 1.0, 200)
    got = metrics.compute(["pearson", "spearmanr"], preds, refs)
    assert got["pearson"] == pytest.approx(scipy.stats.pearsonr(refs, preds)[0], abs=1e-9)
    assert got["spearmanr"] == pytest.approx(scipy.stats.spearmanr(refs, preds)[0], abs=1e-9)
    assert metrics.compute(["pearsonr"], np.ones(5), np.arange(5.0)) == {"pearson": 0.0}  # constant: defined as 0


def test_f1_binary_and_macro():
    refs, preds = [0, 1, 1, 0, 1, 1], [0, 1, 0, 0, 1, 0]
    assert metrics.compute(["f1"], preds, refs, num_labels=2)["f1"] == pytest.approx(f1_score(refs, preds))
    refs3, preds3 = [0, 1, 2, 2, 1, 0], [0, 2, 2, 2, 1, 1]
    assert metrics.compute(["f1"], preds3, refs3, num_labels=3)["f1"] == pytest.approx(f1_score(refs3, preds3, average="macro"))
    assert metrics.compute(["f1_macro"], preds, refs)["f1_macro"] == pytest.approx(f1_score(refs, preds, average="macro"))


def test_refusals():
    with pytest.raises(ValueError, match="unknown metric 'bleu'; known: .*accuracy"):
        metrics.compute(["bleu"], [0], [0])
    with pytest.raises(ValueError, match="2 predictions for 3 references"):
        metrics.compute(["accuracy"], [0, 1], [0, 1, 1])


@pytest.mark.parametrize("module", metrics.MODULES)
def test_module_scripts_one_import_per_line(module):
    # evaluate's dependency check misreads `import a, b`; each module must also be a local evaluate.Metric.
    src = (metrics.METRICS_DIR / module / f"{module}.py").read_text()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            assert len(node.names) == 1, ast.unparse(node)
    assert metrics.load_metric(module).name == module
