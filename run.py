"""Train a model with mixed precision: `python run.py --policy=mixed_bfloat16`.

Flags (one per TrainConfig field) -> TrainConfig -> a training job (trainer/cli/main.py); an
experiment can be a file of flags: `python run.py --flagfile=configs/default.flags`. A user
mistake prints one line and exits 1. `pip install -e .` installs the same command as `mptrain`.
"""

import trainer

if __name__ == "__main__":
    trainer.main()
