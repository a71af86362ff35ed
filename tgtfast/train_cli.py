"""Compatibility module: ``tgtfast train`` now lives in :mod:`tgtfast.cli.train`.

``from tgtfast.train_cli import train_main, ConfigError, load_config, help_config`` keeps working.
"""

from tgtfast.cli.train import CONFIG_KEYS, LOSS_KEYS, ConfigError, help_config, load_config, main, train_main
from tgtfast.train import noise_seed, plot_history

__all__ = ["train_main", "main", "ConfigError", "load_config", "help_config", "CONFIG_KEYS", "LOSS_KEYS",
           "noise_seed", "plot_history"]
