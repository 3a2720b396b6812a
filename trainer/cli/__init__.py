"""The command line (``python run.py``, installed as ``mptrain``): flags -> TrainConfig -> a job.

Nothing here imports TensorFlow until the flags have parsed, so ``--help`` and a bad flag
value are fast.
"""
