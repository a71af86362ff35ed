"""The training code's layout: one module per concern under tgtfast/train/, none over ~500 lines, and the old
import paths (tgtfast.trainer, tgtfast.train_cli) still giving the same public objects."""

import os

import tgtfast
import tgtfast.train as train


def test_old_import_paths_give_the_same_objects():
    from tgtfast import cli, train_cli, trainer

    for name in ("TGTConfig", "TGTTrainer", "TGTHistory", "noise_seed", "plot_history"):
        assert getattr(trainer, name) is getattr(train, name), name
        assert name in train.__all__ and name in trainer.__all__
    for name in ("TGTConfig", "TGTTrainer", "TGTHistory"):
        assert getattr(tgtfast, name) is getattr(train, name)
    from tgtfast.cli import train as cli_train

    for name in ("train_main", "ConfigError", "load_config", "help_config", "CONFIG_KEYS", "LOSS_KEYS"):
        assert getattr(train_cli, name) is getattr(cli_train, name), name
    assert train_cli.noise_seed is train.noise_seed and train_cli.plot_history is train.plot_history
    assert cli_train.train_main is cli_train.main
    assert issubclass(train_cli.ConfigError, ValueError)
    assert "train" in cli.COMMANDS


def test_modules_stay_small():
    here = os.path.dirname(train.__file__)
    sizes = {}
    for name in os.listdir(here):
        if name.endswith(".py"):
            with open(os.path.join(here, name)) as fh:
                sizes[name] = sum(1 for _ in fh)
    assert {"config.py", "data.py", "noise.py", "exploration.py", "checkpoint.py", "records.py",
            "trainer.py"} <= set(sizes)
    assert max(sizes.values()) <= 500, sizes
