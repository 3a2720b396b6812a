"""Where and with whom a run executes: the device (CPU, GPU, Gaudi), the worker's place in a
multi-process job, the ``tf.distribute`` strategy, the collectives every worker runs in
lockstep, and a launcher that starts local workers without MPI.
"""
