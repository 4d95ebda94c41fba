"""Open-Sora training library: config, data, models, diffusion, distributed, training, jobs.

Importing the package sets the environment it needs to run offline and quietly. It imports
nothing heavy: light CLIs (``tasks.meta``) rely on that.
"""

import os

ENV_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "GX_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Servers listen on loopback unless told otherwise (an exported value wins).
    "PREFECT_SERVER_API_HOST": "127.0.0.1",
    "PREFECT_RUNNER_SERVER_HOST": "127.0.0.1",
}

for _key, _value in ENV_DEFAULTS.items():
    os.environ.setdefault(_key, _value)

__version__ = "0.1.0"
