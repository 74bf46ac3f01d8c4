"""Train stage: one VAE (or, with -m, a Hydra multirun sweep), tracked in MLflow.

python pipelines/train.py model.latent_dim=8 objective.beta=4
python pipelines/train.py -m model.latent_dim=2,8,32 objective.beta=0.5,1,4 arch=mlp,conv
python pipelines/train.py -m sweep=latent_beta_arch hydra/launcher=joblib hydra.launcher.n_jobs=2
"""

import os
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from vaelab.config import check_command_line, hydra_errors, validate
from vaelab.errors import exit_on_user_error
from vaelab.logs import quiet_third_party
from vaelab.redaction import plain_secrets
from vaelab.tracking.lifecycle import stop_on_signals

PARAMS = "params"  # dvc.yaml's stages read params.yaml (--config-name params)

os.environ.setdefault("VAELAB_ROOT", str(Path(__file__).resolve().parents[1]))


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    quiet_third_party()
    from vaelab.sweep.jobs import run_job
    from vaelab.sweep.runs import is_multirun

    if is_multirun():  # one job of a sweep: a nested MLflow run; a failure fails this job only (vaelab.sweep.jobs)
        return run_job(cfg)

    if HydraConfig.get().job.config_name == PARAMS:  # a DVC stage, on the params.yaml that DVC wrote
        warn_of_plain_secrets(OmegaConf.to_container(cfg, resolve=False))
    with exit_on_user_error():
        validate(cfg)  # before the heavy imports: a typo fails in a second
        resumed = None
        if cfg.get("resume") is not None:  # and so does a refused resume
            from vaelab.stages.resume import resumption

            resumed = resumption(cfg, list(HydraConfig.get().overrides.task))
        from vaelab.stages.resume import best_epoch_text
        from vaelab.stages.train import train

        summary = train(cfg, resumed=resumed)
    if not summary:
        return None  # a DDP rank other than zero: rank zero reports
    if summary.get("already_finished"):
        return summary.get("val/elbo")  # train() said the run had finished: nothing was trained
    print(
        f"trained ({best_epoch_text(summary)}): val/elbo {summary['val/elbo']:.2f}, "
        f"val/nll_iw {summary['val/nll_iw']:.2f} nats (k={summary['val/iw_k']:.0f}, "
        f"gap {summary['val/inference_gap']:.2f}); {summary['train/images_per_sec']:.0f} training images/s"
    )
    return summary["val/elbo"]


def with_search_sweeper(argv: list[str]) -> list[str]:
    """`hparams_search=<name>` asks for a search, which is vaelab's Optuna sweeper: its choice is added to the command
    line, since Hydra lets conf/train.yaml's own sweeper choice win over one made in a group's file."""
    searched = any(re.fullmatch(r"\+*hparams_search=(?!null$).+", arg) for arg in argv)
    if searched and not any(arg.startswith("hydra/sweeper=") for arg in argv):
        return [*argv, "hydra/sweeper=optuna"]
    return argv


def warn_of_plain_secrets(raw: dict) -> None:
    """DVC keeps params.yaml in git and in every experiment, so a secret there should be an `${oc.env:VAR}`
    interpolation, which params.yaml keeps unresolved when `dvc exp run -S` is given it escaped."""
    for key in plain_secrets(raw):
        print(
            f"vaelab: warning: params.yaml holds a secret in plain text ({key}), and DVC keeps params.yaml in git and "
            f"in every experiment; pass it from the environment instead: dvc exp run -S '{key}=\\${{oc.env:VAR}}'",
            file=sys.stderr,
        )


if __name__ == "__main__":
    # A moved key is named with its new place before Hydra rejects it unnamed; Hydra's own errors (an unknown
    # option or key, an unparsable override) become the same one-line problems as a bad value.
    stop_on_signals()  # SIGTERM, at any point, ends the runs this process owns as Ctrl-C does: KILLED, exit 130
    with exit_on_user_error(), hydra_errors():
        check_command_line(sys.argv[1:])
        sys.argv[1:] = with_search_sweeper(sys.argv[1:])
        main()
