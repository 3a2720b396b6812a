"""The built-in model zoo: one module per model, whose function of the model's name builds it.

:data:`trainer.registry.BUILTIN_MODELS` declares them (``--model=mlp`` ...); the modules import
nothing from the registry. Your own models register with ``@trainer.register_model("name")``.
"""
