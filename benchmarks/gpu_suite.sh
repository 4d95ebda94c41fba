#!/usr/bin/env bash
# The GPU suite's device command: installs the carried wheels, then runs every part of
# benchmarks/gpu_suite.py on the prepared bundle within one time budget.
#
# Here, once (the bundle and the wheels are git-ignored, and travel as `carry`):
#
#   .venv/bin/python benchmarks/gpu_suite.py prepare --out .gpu_bundle        # 9.4 MiB, ~2.5 min
#   .venv/bin/python -m pip wheel --no-deps -w .whl colossalai==0.5.0
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       diffusers==0.42.1 bitsandbytes galore-torch kernels
#
# The GPU machine has torch, transformers, safetensors, pandas, pyarrow, psutil, tqdm and pyyaml;
# it lacks diffusers (the VAE classes), colossalai (the Booster; it needs bitsandbytes,
# galore-torch and kernels beside it), av, mlflow, prefect and dvc. The run imports none of the
# last four: the bundle carries cached latents and decoded frames, tracking is off. Sizes as
# downloaded on 2026-12-07: bitsandbytes 0.50.2 43.1 MB, diffusers 0.42.1 6.4 MB, kernels 0.19.1
# 2.7 MB, colossalai 0.5.0 1.6 MB, galore-torch 1.0 0.01 MB (51.3 MiB together); with the 9.4 MiB
# bundle and the 1.7 MiB working tree that is 62.4 of the 64 MiB a device call carries.
#
# The device call (run in the repository root; $OUT is the folder that comes back):
#
#   bash benchmarks/gpu_suite.sh        carry: [".gpu_bundle", ".whl"], timeout_s: 570
#
# Environment: GPU_SUITE_BUNDLE (default .gpu_bundle), GPU_SUITE_BUDGET_S (default 480),
# OUT (default ./gpu_suite_out), PYTHON (default python3). Extra arguments go to
# `gpu_suite.py run` (--tiny for the CPU dry run, --parts to pick parts).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

export HF_HUB_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false GX_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
site=""
if compgen -G ".whl/*.whl" >/dev/null; then
    site=${GPU_SUITE_SITE:-/tmp/gpu-suite-site}
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
        || { echo "gpu_suite.sh: installing the carried wheels failed" >&2; exit 3; }
fi
export PYTHONPATH="${site:+$site:}$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-$PWD/gpu_suite_out}
mkdir -p "$OUT"
exec "$PY" benchmarks/gpu_suite.py run --bundle "${GPU_SUITE_BUNDLE:-.gpu_bundle}" --out "$OUT" \
    --budget-s "${GPU_SUITE_BUDGET_S:-480}" "$@"
