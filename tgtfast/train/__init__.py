"""Teacher Guided Training: :class:`TGTTrainer` and :class:`TGTConfig` (``tgtfast train`` on the command line).

One module per concern: :mod:`~tgtfast.train.config` (the settings and their checks),
:mod:`~tgtfast.train.data` (datasets, batches, the order of the examples), :mod:`~tgtfast.train.streams`
(labelled and unlabelled examples in every batch), :mod:`~tgtfast.train.noise` (the
random streams), :mod:`~tgtfast.train.preflight` (shape and label checks, the teacher cache),
:mod:`~tgtfast.train.exploration` (new samples from the latent space), :mod:`~tgtfast.train.checkpoint`
(files, checkpoints, fingerprints), :mod:`~tgtfast.train.records` (history, metrics, plots),
:mod:`~tgtfast.train.distributed` (torchrun) and :mod:`~tgtfast.train.trainer` (the training loop).
"""

from tgtfast.train.config import ShortRunWarning, TGTConfig
from tgtfast.train.noise import noise_seed
from tgtfast.train.records import TGTHistory, plot_history
from tgtfast.train.trainer import TGTTrainer

__all__ = ["TGTConfig", "TGTTrainer", "TGTHistory", "ShortRunWarning", "noise_seed", "plot_history"]
