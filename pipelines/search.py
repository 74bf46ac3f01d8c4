"""Search stage: an Optuna study, one nested MLflow run per trial. A shorthand for the Hydra form,

    python pipelines/train.py -m hparams_search=<name> <overrides>

which this script runs: `search=<name>` becomes `hparams_search=<name>` (default: default), `search.sampler=` and
`search.pruner=` choose `hydra/sweeper/sampler` and `hydra/sweeper/pruner`, `search.seed=` is the sampler's seed,
`search.pruner_options.<pruner>.<key>=` the pruner's `<key>`, and any other `search.<key>=` is `hydra.sweeper.<key>=`.

    python pipelines/search.py                                   # hparams_search=default
    python pipelines/search.py search.n_trials=40 trainer.max_epochs=5 data.limit_train=5000
    python pipelines/search.py search=architecture search.storage=postgresql+psycopg://user@host/optuna

The study is persistent: rerunning a command resumes its study until it has n_trials finished trials, and several
processes may run the same command at once to share the work.
"""

import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "pipelines" / "train.py"
SPACE_GROUP = "hparams_search"
RENAMED = [  # (the old form, the Hydra form), tried in order
    (r"search=(.*)", SPACE_GROUP + r"=\1"),
    (r"search\.(sampler|pruner)=(.*)", r"hydra/sweeper/\1=\2"),
    (r"search\.seed=(.*)", r"hydra.sweeper.sampler.seed=\1"),
    (r"search\.pruner_options\.\w+\.(.*)", r"hydra.sweeper.pruner.\1"),
    (r"([+~]*)search\.(.*)", r"\1hydra.sweeper.\2"),
]


def hydra_form(argv: list[str]) -> list[str]:
    """The Hydra multirun command line for the same search."""
    translated = []
    for arg in argv:
        if re.match(r"[+~]*search\.space\b", arg):
            print(
                f"vaelab: {arg}: a search space is hydra.sweeper.params in Hydra's sweeper syntax now; give a "
                "parameter as a sweep override, e.g. 'objective.beta=tag(log,interval(0.5,4))', or fix a searched "
                "key with a plain value (objective.beta=1)",
                file=sys.stderr,
            )
            sys.exit(2)
        translated.append(next((re.sub(old, new, arg) for old, new in RENAMED if re.fullmatch(old, arg)), arg))
    if not any(arg.lstrip("+").startswith(f"{SPACE_GROUP}=") for arg in translated):
        translated.insert(0, f"{SPACE_GROUP}=default")
    return ["-m", "hydra/sweeper=optuna", *translated]


def main(argv: list[str]) -> None:
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        sys.exit(0)
    command = hydra_form(argv)
    os.execv(sys.executable, [sys.executable, str(TRAIN), *command])


if __name__ == "__main__":
    main(sys.argv[1:])
