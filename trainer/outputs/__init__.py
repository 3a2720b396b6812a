"""What a run leaves behind and shows: the ``--model_dir`` layout (one module owns it),
checkpoints, the exported SavedModel, TensorBoard summaries, the metrics file and console
lines. Only the chief writes; saving and export are collectives every worker runs.
"""
