"""Training building blocks shared by the jobs: checkpoints, EMA, LR schedules."""
