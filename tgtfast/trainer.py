"""Compatibility module: Teacher Guided Training now lives in the package :mod:`tgtfast.train`.

``from tgtfast.trainer import TGTConfig, TGTTrainer, TGTHistory, noise_seed, plot_history`` keeps working;
new code imports them from :mod:`tgtfast.train` (or ``tgtfast``).
"""

from tgtfast.train import TGTConfig, TGTHistory, TGTTrainer, noise_seed, plot_history

__all__ = ["TGTConfig", "TGTTrainer", "TGTHistory", "noise_seed", "plot_history"]
