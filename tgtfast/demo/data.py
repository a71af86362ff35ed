"""The demo's data: scikit-learn's 8x8 digits split once into teacher-train, validation and test, and the
stratified few-label subsets the students learn from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch


@dataclass
class DigitsSplits:
    """The fixed splits: ``x_*`` float32 ``[N, 64]`` in ``[0, 1]``, ``y_*`` int64 ``[N]``."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def sizes(self) -> Dict[str, int]:
        return {"teacher_train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}


def load_digits_splits(seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.25) -> DigitsSplits:
    """scikit-learn's digits, pixels ``/ 16``, split stratified into teacher-train / validation / test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction and test_fraction must be in (0, 1) with a sum below 1, got "
                         f"{val_fraction} and {test_fraction}")
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    idx = list(range(len(y)))
    rest, test = train_test_split(idx, test_size=test_fraction, stratify=y.numpy(), random_state=seed)
    train, val = train_test_split(rest, test_size=val_fraction / (1 - test_fraction), stratify=y[rest].numpy(),
                                  random_state=seed)
    tr, va, te = (torch.tensor(sorted(s)) for s in (train, val, test))
    return DigitsSplits(x[tr], y[tr], x[va], y[va], x[te], y[te])


def few_label_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices of ``n`` examples drawn stratified from ``labels``: ``n // K`` per class, the remainder spread over
    randomly chosen classes (at most one extra each). Deterministic in ``seed``."""
    k = int(labels.max()) + 1
    if n < k:
        raise ValueError(f"n must be at least the number of classes ({k}), got {n}")
    if n > len(labels):
        raise ValueError(f"n must be at most the number of examples ({len(labels)}), got {n}")
    g = torch.Generator().manual_seed(10_007 * seed + n)
    per_class = torch.full((k,), n // k, dtype=torch.int64)
    per_class[torch.randperm(k, generator=g)[: n % k]] += 1
    picked = []
    for c in range(k):
        pool = (labels == c).nonzero().flatten()
        if len(pool) < per_class[c]:
            raise ValueError(f"class {c} has only {len(pool)} examples, {int(per_class[c])} asked")
        picked.append(pool[torch.randperm(len(pool), generator=g)[: per_class[c]]])
    return torch.cat(picked).sort().values
