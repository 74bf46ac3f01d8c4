"""Sweeps on a SLURM cluster: `hydra/launcher=slurm` (conf/hydra/launcher/slurm.yaml) extends the
hydra-submitit-launcher plugin's `submitit_slurm` with vaelab's defaults: one GPU per job, a time limit, the partition
from $SLURM_PARTITION.

There is no SLURM here, so nothing is submitted. The tests check what would be: the launcher config as Hydra shows it
(`--cfg hydra`) and the plugin's launcher built from it; a slow test runs a real sweep through the plugin's local
executor.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from helpers.config import CONF, REPO, TINY_TRIAL
from helpers.processes import run_entry, subprocess_env
from helpers.stores import all_runs

LAUNCHER = "hydra/launcher=slurm"


def show_launcher(*overrides: str, **env: str) -> subprocess.CompletedProcess:
    """`python pipelines/train.py <overrides> --cfg hydra -p hydra.launcher --resolve`, as a user would type it.

    (Hydra takes --cfg without -m: the multirun's launcher is the one shown.)"""
    return subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "train.py"), *overrides, "--cfg", "hydra", "-p", "hydra.launcher"]
        + ["--resolve"],
        env=subprocess_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def launcher_config(*overrides: str):
    """The composed hydra.launcher node, resolved, for `hydra/launcher=slurm <overrides>`."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[LAUNCHER, *overrides], return_hydra_config=True)
    return cfg.hydra.launcher


@pytest.mark.subprocess
def test_cfg_hydra_shows_our_slurm_defaults():
    done = show_launcher(LAUNCHER, SLURM_PARTITION="gpu-test")
    assert done.returncode == 0, done.stderr
    shown = yaml.safe_load(done.stdout)
    assert shown["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert shown["gpus_per_node"] == 1 and shown["tasks_per_node"] == 1 and shown["nodes"] == 1
    assert shown["timeout_min"] == 240
    assert shown["partition"] == "gpu-test"  # from $SLURM_PARTITION
    assert shown["max_num_timeout"] == 0
    assert "deprecat" not in done.stderr.lower()  # our file does not shadow the plugin's config (schema matching)


@pytest.mark.subprocess
def test_without_slurm_partition_the_cluster_default_is_used():
    env = subprocess_env()
    env.pop("SLURM_PARTITION", None)
    done = subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "train.py"), LAUNCHER, "--cfg", "hydra", "-p", "hydra.launcher",
         "--resolve"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)["partition"] is None  # no --partition line: sbatch's default partition


@pytest.mark.subprocess
def test_the_plugin_schema_checks_our_keys():
    """Our file extends the plugin's config, so a misspelt key or a wrong type fails before anything is submitted."""
    typo = show_launcher(LAUNCHER, "hydra.launcher.gpus_per_nod=2")
    assert typo.returncode != 0
    assert "gpus_per_nod" in typo.stderr
    wrong_type = show_launcher(LAUNCHER, "hydra.launcher.timeout_min=two_hours")
    assert wrong_type.returncode != 0
    assert "timeout_min" in wrong_type.stderr


def test_the_launcher_hydra_builds_for_a_sweep_gets_the_partition_and_the_run_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    monkeypatch.setenv("SLURM_PARTITION", "gpu-test")
    monkeypatch.setenv("VAELAB_ROOT", str(tmp_path))
    launcher = instantiate(launcher_config())  # the plugin's launcher object, as Hydra builds it for `-m`
    assert type(launcher).__name__ == "SlurmLauncher"
    assert launcher.params["partition"] == "gpu-test"
    folder = launcher.params["submitit_folder"]
    assert folder.startswith(f"{tmp_path}/outputs/multirun/") and folder.endswith("/.submitit/%j")


def test_overrides_reach_the_launcher(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("SLURM_PARTITION", raising=False)
    launcher = instantiate(
        launcher_config(
            "hydra.launcher.timeout_min=30",
            "hydra.launcher.gpus_per_node=4",
            "+hydra.launcher.additional_parameters.account=vae-lab",
        )
    )
    assert (launcher.params["timeout_min"], launcher.params["gpus_per_node"]) == (30, 4)
    assert launcher.params["additional_parameters"] == {"account": "vae-lab"}
    assert launcher.params["partition"] is None


@pytest.mark.subprocess
@pytest.mark.slow
def test_a_sweep_runs_through_the_submitit_plugin_with_its_local_executor(project: Path):
    """The plugin's other launcher, submitit_local, runs each job as its own submitit process on this machine: the
    path a SLURM job takes (the pickled task, submitit's job environment), without SLURM."""
    done = run_entry("train.py", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", *TINY_TRIAL,
                     "model.latent_dim=2,4", root=project)  # fmt: skip
    assert "Sweep summary: 2 jobs, 0 failed" in done.stdout, done.stdout[-3000:]
    runs = all_runs(project)
    [parent] = [run for run in runs if run.data.tags.get("vaelab.kind") == "sweep"]
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(run.data.params["model.latent_dim"] for run in children) == ["2", "4"]
    assert {run.info.status for run in [parent, *children]} == {"FINISHED"}
    assert list(project.glob("outputs/multirun/*/.submitit/*"))  # submitit's job folders: it really ran them
