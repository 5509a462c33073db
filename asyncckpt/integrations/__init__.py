"""Framework integrations; each imports its framework, so import the one you use:

- ``asyncckpt.integrations.lightning``: ``AsyncCkptIO`` (a Lightning ``CheckpointIO`` plugin)
  and ``AsyncCheckpoint`` (a Lightning ``Callback`` driven by a ``CheckpointManager``).
- ``asyncckpt.integrations.hf``: ``accelerate_state`` (a ``TrainState`` from an
  ``Accelerator``'s prepared objects) and ``AsyncCheckpointCallback`` (a transformers
  ``TrainerCallback``).

Neither framework is a dependency of asyncckpt: importing a module here without its
framework installed raises an ``ImportError`` that says what to install.
"""
