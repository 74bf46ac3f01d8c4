"""Hydra multirun sweeps: one parent MLflow run per sweep, one nested child per job, a summary at the end
(vaelab.sweep.runs tells how the pieces meet)."""
