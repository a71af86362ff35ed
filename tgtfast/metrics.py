"""Classification metrics shared by the trainer, the demo and anything else that reports a classifier:
accuracy, negative log-likelihood (NLL) and expected calibration error (ECE).

ECE (Naeini et al. 2015; Guo et al. 2017, *On Calibration of Modern Neural Networks*) with ``B`` equal-width
bins over the confidence ``c_n = max_k p_nk`` (default ``B = 15``): bin ``b`` (``b = 1 .. B``) holds the rows
with ``c_n`` in ``((b - 1) / B, b / B]`` (bin 1 also takes ``c_n = 0``), and

    ECE = sum_b (|bin b| / N) * |accuracy(bin b) - mean confidence(bin b)|

where a row is correct when its arg-max class (``torch.max``'s pick on ties) is its label. Empty
bins add nothing. NLL is the mean of ``-log p_{n, y_n}`` (natural log), computed from logits as
``-log_softmax`` (no ``log 0`` for a confident wrong prediction) and from probabilities as ``-log p`` (``+inf``
where a label has probability 0). Everything is accumulated in float64.

Three ways in:

* :func:`expected_calibration_error` and :func:`negative_log_likelihood` take probabilities ``[N, K]`` (rows on
  the simplex; logits passed by mistake are an error naming ``probs``);
* :func:`classification_metrics` takes logits ``[N, K]`` (optionally at a temperature) and returns accuracy,
  NLL and ECE at once;
* :class:`ClassificationMeter` accumulates the same three over batches (``update(logits=...)`` or
  ``update(probs=...)``), so an evaluation loop never holds every row; its sums are additive, so meters of
  several processes or data shards can be merged with :meth:`ClassificationMeter.merge`.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from tgtfast import validation

__all__ = [
    "DEFAULT_BINS",
    "ClassificationMeter",
    "classification_metrics",
    "expected_calibration_error",
    "negative_log_likelihood",
    "calibration_bins",
]

DEFAULT_BINS = 15
_F64 = torch.float64


def _labels(labels: torch.Tensor, n: int, k: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of class indices, got {labels.dtype}")
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape [{n}] (one per row), got {tuple(labels.shape)}")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise ValueError(f"labels must be class indices in [0, {k}); found values in "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    return labels.long()


def _matrix(name: str, x: torch.Tensor) -> torch.Tensor:
    validation.tensor(name, x, dims=(2,), floating=True)
    if x.shape[1] < 1:
        raise ValueError(f"{name} must have at least one class, got shape {tuple(x.shape)}")
    return x.detach()


def _bins(num_bins: int) -> int:
    return validation.integer("num_bins", num_bins, low=1)


def _probs(probs: torch.Tensor) -> torch.Tensor:
    p = _matrix("probs", probs)
    validation.probabilities("probs", p, what=" (rows of probabilities; pass logits to classification_metrics)")
    return p.to(_F64)


def calibration_bins(confidence: torch.Tensor, correct: torch.Tensor, num_bins: int = DEFAULT_BINS
                     ) -> Dict[str, torch.Tensor]:
    """Per-bin sums of the equal-width reliability diagram: ``count``, ``confidence`` (sum of the rows'
    confidences) and ``correct`` (number of correct rows), each ``[num_bins]`` float64. ``confidence`` ``[N]``
    in ``[0, 1]``; ``correct`` ``[N]`` bool. Bin ``b`` (0-based) holds ``c`` in ``(b / B, (b + 1) / B]``, and
    bin 0 also ``c = 0``."""
    num_bins = _bins(num_bins)
    validation.tensor("confidence", confidence, dims=(1,), floating=True)
    validation.tensor("correct", correct, dims=(1,))
    if correct.shape != confidence.shape:
        raise ValueError(f"correct must have the shape of confidence {tuple(confidence.shape)}, "
                         f"got {tuple(correct.shape)}")
    c = confidence.detach().to(_F64)
    if c.numel() and (not bool(torch.isfinite(c).all()) or float(c.min()) < 0 or float(c.max()) > 1 + 1e-12):
        raise ValueError("confidence must be in [0, 1]")
    idx = (torch.ceil(c * num_bins) - 1).clamp(0, num_bins - 1).long()
    z = torch.zeros(num_bins, dtype=_F64, device=c.device)
    return {
        "count": z.index_add(0, idx, torch.ones_like(c)),
        "confidence": z.index_add(0, idx, c),
        "correct": z.index_add(0, idx, correct.detach().to(_F64)),
    }


def _ece_from_bins(bins: Dict[str, torch.Tensor]) -> float:
    n = float(bins["count"].sum())
    if n == 0:
        return float("nan")
    return float((bins["correct"] - bins["confidence"]).abs().sum() / n)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, *, num_bins: int = DEFAULT_BINS) -> float:
    """ECE of the predicted probabilities ``probs`` ``[N, K]`` against integer ``labels`` ``[N]`` with
    ``num_bins`` equal-width confidence bins (see the module docstring). NaN for ``N = 0``."""
    p = _probs(probs)
    y = _labels(labels, p.shape[0], p.shape[1]).to(p.device)
    conf, pred = p.max(1)
    return _ece_from_bins(calibration_bins(conf, pred == y, num_bins))


def negative_log_likelihood(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean ``-log probs[n, labels[n]]`` (natural log; ``+inf`` if a label has probability 0; NaN for ``N = 0``)."""
    p = _probs(probs)
    y = _labels(labels, p.shape[0], p.shape[1]).to(p.device)
    if p.shape[0] == 0:
        return float("nan")
    return float(-torch.log(p.gather(1, y[:, None])).mean())


class ClassificationMeter:
    """Accuracy, NLL and ECE accumulated over batches.

    >>> meter = ClassificationMeter()
    >>> for x, y in batches:                       # doctest: +SKIP
    ...     meter.update(y, logits=model(x))
    >>> meter.compute()                            # doctest: +SKIP
    {'accuracy': ..., 'nll': ..., 'ece': ..., 'count': ...}
    """

    def __init__(self, num_bins: int = DEFAULT_BINS) -> None:
        self.num_bins = _bins(num_bins)
        self.reset()

    def reset(self) -> None:
        """Forget every row seen."""
        self.count = 0.0
        self.nll_sum = 0.0
        self.bins = {key: torch.zeros(self.num_bins, dtype=_F64) for key in ("count", "confidence", "correct")}

    def update(self, labels: torch.Tensor, *, logits: Optional[torch.Tensor] = None,
               probs: Optional[torch.Tensor] = None, temperature: float = 1.0) -> None:
        """Add a batch: ``labels`` ``[N]`` and exactly one of ``logits`` ``[N, K]`` (probabilities
        ``softmax(logits / temperature)``) or ``probs`` ``[N, K]`` (used as given; ``temperature`` must be 1)."""
        if (logits is None) == (probs is None):
            raise TypeError("pass exactly one of logits= or probs=")
        if logits is not None:
            s = _matrix("logits", logits).to(_F64)
            t = validation.real("temperature", temperature, low=0.0, low_inclusive=False)
            logp = torch.log_softmax(s / t, -1)
        else:
            if temperature != 1.0:
                raise ValueError("temperature applies to logits; probs are used as given (temperature must be 1)")
            logp = torch.log(_probs(probs))
        y = _labels(labels, logp.shape[0], logp.shape[1]).to(logp.device)
        if logp.shape[0] == 0:
            return
        conf, pred = logp.max(1)
        part = calibration_bins(conf.exp(), pred == y, self.num_bins)
        for key in self.bins:
            self.bins[key] += part[key].cpu()
        self.nll_sum += float(-logp.gather(1, y[:, None]).sum())
        self.count += float(logp.shape[0])

    def merge(self, other: "ClassificationMeter") -> "ClassificationMeter":
        """Add the rows of another meter with the same number of bins (e.g. another shard); returns self."""
        if not isinstance(other, ClassificationMeter) or other.num_bins != self.num_bins:
            raise ValueError("merge needs a ClassificationMeter with the same num_bins")
        for key in self.bins:
            self.bins[key] += other.bins[key]
        self.nll_sum += other.nll_sum
        self.count += other.count
        return self

    def compute(self) -> Dict[str, float]:
        """``{"accuracy", "nll", "ece", "count"}`` over every row added (NaN metrics when there is none)."""
        if self.count == 0:
            nan = float("nan")
            return {"accuracy": nan, "nll": nan, "ece": nan, "count": 0}
        return {
            "accuracy": float(self.bins["correct"].sum()) / self.count,
            "nll": self.nll_sum / self.count,
            "ece": _ece_from_bins(self.bins),
            "count": int(self.count),
        }


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                           num_bins: int = DEFAULT_BINS) -> Dict[str, float]:
    """Accuracy, NLL and ECE of ``softmax(logits / temperature)`` against ``labels``: a dict with keys
    ``accuracy``, ``nll``, ``ece`` and ``count``."""
    meter = ClassificationMeter(num_bins)
    meter.update(labels, logits=logits, temperature=temperature)
    return meter.compute()
