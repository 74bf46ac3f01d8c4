"""Search stage: an Optuna study over a search space in conf/search/, one nested MLflow run per trial.

    python pipelines/search.py                                   # search=default (conf/search/default.yaml)
    python pipelines/search.py search.n_trials=40 trainer.max_epochs=5 data.limit_train=5000
    python pipelines/search.py search=architecture search.storage=postgresql+psycopg://user@host/optuna

The arguments are Hydra overrides of conf/train.yaml and of the chosen conf/search/<name>.yaml. The study is
persistent: rerunning a command resumes its study until it has search.n_trials finished trials, and several
processes may run the same command at once to share the work.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("VAELAB_ROOT", str(ROOT))


def main(argv: list[str]) -> int:
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        return 0
    from vaelab.errors import exit_on_user_error
    from vaelab.logs import quiet_third_party
    from vaelab.search.driver import search
    from vaelab.tracking.lifecycle import stop_on_signals

    quiet_third_party()
    stop_on_signals()  # SIGTERM, at any point, fails the running trial and ends its runs as Ctrl-C does: exit 130

    with exit_on_user_error():
        try:
            result = search(argv, config_dir=ROOT / "conf")
        except KeyboardInterrupt:
            print("search: interrupted; rerun the same command to resume the study", file=sys.stderr)
            return 130
    print(result.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
