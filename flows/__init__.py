"""Prefect flows over the DVC stages.

Importing the package first imports :mod:`opensora_core`, which sets the offline environment
(analytics off, Hugging Face offline) before any flow module imports Prefect.
"""

import opensora_core  # noqa: F401
