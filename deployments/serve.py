"""Serve every a2k flow from one long-running process, with the schedules of deployments/prefect.yaml.

The single-machine alternative to a work pool and a worker: `python deployments/serve.py` (from the repository
root, or any folder once the package is installed) registers `classify-images/nightly` and the three
`*/on-demand` deployments and runs their flow runs as subprocesses of this process until it is stopped.
Names, schedules and parameters only; the work is in `flows/`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# `python deployments/serve.py` puts deployments/ first on sys.path; the flows live one folder up
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# warnings of the plain functions (e.g. the GPU out-of-memory back-off) reach the run's log, as in prefect.yaml
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tasks")

from prefect import serve  # noqa: E402
from prefect.deployments.runner import EntrypointType, RunnerDeployment  # noqa: E402
from prefect.schedules import Cron  # noqa: E402

from flows.classify_images import classify_images  # noqa: E402
from flows.compress_model import compress_model  # noqa: E402
from flows.evaluate_model import evaluate_model  # noqa: E402
from flows.train_model import train_model  # noqa: E402

NIGHTLY = Cron("0 2 * * *", timezone="UTC")
NIGHTLY_PARAMETERS = {"input": "/data/photos", "output": "/data/predictions", "model": "models:/digits-cnn@production"}
# entry points as module paths (flows.classify_images.classify_images): a run loads the installed package,
# whatever folder this script was started from
BY_MODULE = EntrypointType.MODULE_PATH


def a2k_deployments() -> list[RunnerDeployment]:
    """The deployments this script serves, the same as those in deployments/prefect.yaml."""
    return [
        classify_images.to_deployment(name="nightly", schedule=NIGHTLY, parameters=NIGHTLY_PARAMETERS,
                                      tags=["a2k", "classify"], entrypoint_type=BY_MODULE),
        train_model.to_deployment(name="on-demand", tags=["a2k", "train"], entrypoint_type=BY_MODULE),
        compress_model.to_deployment(name="on-demand", tags=["a2k", "compress"], entrypoint_type=BY_MODULE),
        evaluate_model.to_deployment(name="on-demand", tags=["a2k", "evaluate"], entrypoint_type=BY_MODULE),
    ]


if __name__ == "__main__":
    serve(*a2k_deployments())
