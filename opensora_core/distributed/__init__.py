"""Distributed-job infrastructure.

- :mod:`~opensora_core.distributed.launcher`: builds the ``torchrun`` command from the ``launch``
  section, runs it in its own process group and maps the workers' failures to the pipeline's exit
  codes. Imports neither torch nor colossalai, so stage CLIs can launch jobs cheaply.
- :mod:`~opensora_core.distributed.dist`: process-group setup inside a job, small collectives,
  seeding and RNG state capture.
- :mod:`~opensora_core.distributed.booster`: the ColossalAI Booster for a plugin name
  (colossalai is imported lazily, inside :func:`build_booster`).

This package ``__init__`` imports nothing, so ``import opensora_core.distributed.launcher`` stays light.
"""
