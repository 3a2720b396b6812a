"""What a step does: the Trainer (compiled, loss-scaled train and eval steps with hooks for
subclasses), dtype policies, loss scaling, optimizers, subclass contracts and the weighted
evaluation metrics.
"""
