"""tgtfast.metrics: ECE and NLL against hand computations and a plain-Python loop, batching, bad input."""

import math

import pytest
import torch

from tgtfast import metrics


def _ece_loop(probs, labels, bins):
    """ECE by the textbook definition, one row at a time in Python floats."""
    rows = probs.tolist()
    members = [[] for _ in range(bins)]
    for row, y in zip(rows, labels.tolist()):
        c = max(row)
        pred = row.index(c)
        b = max(0, min(bins - 1, math.ceil(c * bins) - 1))
        members[b].append((c, pred == y))
    n = len(rows)
    total = 0.0
    for m in members:
        if m:
            acc = sum(ok for _, ok in m) / len(m)
            conf = sum(c for c, _ in m) / len(m)
            total += len(m) / n * abs(acc - conf)
    return total


def test_ece_and_nll_by_hand():
    # 4 rows, 2 classes, 2 bins (0, .5] and (.5, 1]:
    # row 0: conf .9 pred 0, label 0 (right); row 1: conf .8 pred 1, label 0 (wrong) -> bin 2: acc .5, conf .85
    # row 2: conf .6 pred 0, label 0 (right);                                          -> bin 2 as well
    # row 3: conf .5 (tie, bin 1), label 1
    p = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
    y = torch.tensor([0, 0, 0, 1])
    # bin 2: rows 0, 1, 2 -> acc 2/3, conf (0.9 + 0.8 + 0.6) / 3; bin 1: row 3 -> acc 0 or 1 (tie), conf 0.5
    pred3 = int(p[3].argmax())
    acc1 = 1.0 if pred3 == 1 else 0.0
    want = 3 / 4 * abs(2 / 3 - 2.3 / 3) + 1 / 4 * abs(acc1 - 0.5)
    assert metrics.expected_calibration_error(p, y, num_bins=2) == pytest.approx(want, abs=1e-7)
    nll = -(math.log(0.9) + math.log(0.2) + math.log(0.6) + math.log(0.5)) / 4
    assert metrics.negative_log_likelihood(p, y) == pytest.approx(nll, abs=1e-7)


def test_perfectly_calibrated_bins_give_zero():
    # confidence 0.75 in every row, 3 of 4 right: accuracy equals confidence in the only bin used
    p = torch.tensor([[0.75, 0.25]] * 4)
    y = torch.tensor([0, 0, 0, 1])
    assert metrics.expected_calibration_error(p, y) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("bins", [1, 15, 40])
def test_ece_matches_the_loop_and_logits_match_probs(bins):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 7, generator=g, dtype=torch.float64) * 2.5
    y = torch.randint(0, 7, (500,), generator=g)
    p = torch.softmax(logits, -1)
    want = _ece_loop(p, y, bins)
    assert metrics.expected_calibration_error(p, y, num_bins=bins) == pytest.approx(want, abs=1e-12)
    m = metrics.classification_metrics(logits, y, num_bins=bins)
    assert m["ece"] == pytest.approx(want, abs=1e-12)
    assert m["nll"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)), abs=1e-12)
    assert m["accuracy"] == pytest.approx(float((logits.argmax(1) == y).double().mean()), abs=0)
    assert m["count"] == 500
    # temperature: the same as dividing the logits
    m2 = metrics.classification_metrics(logits, y, temperature=3.0, num_bins=bins)
    assert m2["ece"] == pytest.approx(_ece_loop(torch.softmax(logits / 3, -1), y, bins), abs=1e-12)


def test_meter_over_batches_equals_one_call_and_merges():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(300, 5, generator=g)
    y = torch.randint(0, 5, (300,), generator=g)
    whole = metrics.classification_metrics(logits, y)
    a, b = metrics.ClassificationMeter(), metrics.ClassificationMeter()
    for i in range(0, 300, 64):
        (a if i < 128 else b).update(y[i:i + 64], logits=logits[i:i + 64])
    merged = a.merge(b).compute()
    for key in ("accuracy", "nll", "ece"):
        assert merged[key] == pytest.approx(whole[key], abs=1e-9), key
    assert merged["count"] == 300
    empty = metrics.ClassificationMeter().compute()
    assert empty["count"] == 0 and math.isnan(empty["ece"])


def test_confidently_wrong_probability_zero_gives_infinite_nll_but_logits_stay_finite():
    p = torch.tensor([[1.0, 0.0]])
    assert metrics.negative_log_likelihood(p, torch.tensor([1])) == math.inf
    m = metrics.classification_metrics(torch.tensor([[200.0, -200.0]]), torch.tensor([1]))
    assert m["nll"] == pytest.approx(400.0) and m["ece"] == pytest.approx(1.0)


def test_bad_input_names_the_argument():
    p = torch.tensor([[0.7, 0.3]])
    with pytest.raises(ValueError, match="probs"):
        metrics.expected_calibration_error(torch.tensor([[2.0, -1.0]]), torch.tensor([0]))  # logits by mistake
    with pytest.raises(ValueError, match="labels"):
        metrics.expected_calibration_error(p, torch.tensor([2]))
    with pytest.raises(TypeError, match="labels"):
        metrics.expected_calibration_error(p, torch.tensor([0.0]))
    with pytest.raises(ValueError, match="labels"):
        metrics.negative_log_likelihood(p, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="num_bins"):
        metrics.expected_calibration_error(p, torch.tensor([0]), num_bins=0)
    with pytest.raises(TypeError, match="exactly one"):
        metrics.ClassificationMeter().update(torch.tensor([0]))
    with pytest.raises(ValueError, match="temperature"):
        metrics.ClassificationMeter().update(torch.tensor([0]), probs=p, temperature=2.0)
    with pytest.raises(ValueError, match="confidence"):
        metrics.calibration_bins(torch.tensor([1.5]), torch.tensor([True]))
