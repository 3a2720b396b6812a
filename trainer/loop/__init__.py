"""When things happen: the Controller runs step loops to a step count and calls periodic
actions between them; ``fit`` is the standard set-up (epochs, evaluation, checkpoints, logs,
stop checks); preemption signals and the profiler's step range are actions too.
"""
