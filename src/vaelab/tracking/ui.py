"""What `make ui` prints before it serves the store: each experiment's link straight to its runs table.

MLflow 3's UI opens every experiment in its GenAI view (an overview of traces, the runs under "Evaluation runs")
unless the address asks for the Model training view or the user has switched its toggle once; an experiment's own
kind tag does not decide it. Each link here asks, so a researcher lands on the runs table, ready to Compare.

    python -m vaelab.tracking.ui --store sqlite:///<project>/mlflow.db --address http://127.0.0.1:5000
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from vaelab.tracking.store import _sqlite_path

MODEL_TRAINING_VIEW = "workflowType=machine_learning"  # the UI's own query parameter for its Model training view
MOST_RUNS_COUNTED = 1000  # one page of runs per experiment; more show as "1000+"


@dataclass(frozen=True)
class ExperimentLink:
    name: str
    runs: str
    url: str


def experiment_links(store: str, address: str) -> list[ExperimentLink]:
    """The store's active experiments that hold runs, newest first, each with its run count and its runs table's
    address. Looking creates nothing: no store yet means no experiments."""
    db = _sqlite_path(store)
    if db is not None and not db.exists():
        return []
    from mlflow import MlflowClient

    client = MlflowClient(store)
    links = []
    for experiment in client.search_experiments(order_by=["creation_time DESC"]):
        found = len(client.search_runs([experiment.experiment_id], max_results=MOST_RUNS_COUNTED))
        if not found:
            continue  # MLflow's own empty Default experiment, say
        runs = f"{found}+" if found == MOST_RUNS_COUNTED else str(found)
        url = f"{address}/#/experiments/{experiment.experiment_id}/runs?{MODEL_TRAINING_VIEW}"
        links.append(ExperimentLink(experiment.name, runs, url))
    return links


def describe(links: list[ExperimentLink], address: str) -> str:
    if not links:
        return (
            f"MLflow UI at {address} (Ctrl-C stops it). No experiment yet: once a run is trained, open "
            f"{address}/#/experiments?{MODEL_TRAINING_VIEW} and pick it."
        )
    width = max(len(link.name) for link in links)
    lines = [f"  {link.name:<{width}}  {link.runs:>5} runs  {link.url}" for link in links]
    return "\n".join(
        [
            f"MLflow UI at {address} (Ctrl-C stops it). Each experiment's runs table, in the Model training view:",
            *lines,
            "Tick the runs to compare (the header box ticks them all), then press Compare.",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="the tracking URI the UI serves")
    parser.add_argument("--address", required=True, help="where the UI answers, e.g. http://127.0.0.1:5000")
    args = parser.parse_args(argv)
    print(describe(experiment_links(args.store, args.address), args.address), flush=True)


if __name__ == "__main__":
    main()
