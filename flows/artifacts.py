"""Artifact keys: each flow's artifacts keyed by the flows it runs inside, root first, and the deployment it was
started from, so a classify run inside evaluate-model or a deployment does not take the key of a plain run.

`classify-images-summary` (a plain run), `classify-images-nightly-summary` (deployment `nightly`),
`evaluate-model-classify-images-summary` (inside evaluate-model), `a2k-demo-compress-model-digits-cnn-v2`."""

from __future__ import annotations

import re
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.runtime import flow_run

_INVALID = re.compile(r"[^a-z0-9-]+")


def artifact_key(name: str) -> str:
    """A valid Prefect artifact key (lowercase letters, digits, dashes) for this flow run's artifact `name`."""
    return _slug("-".join([*_run_chain(), name]))


def _slug(text: str) -> str:
    return re.sub("-{2,}", "-", _INVALID.sub("-", text.lower())).strip("-")


def _run_chain() -> list[str]:
    """Flow names from the root run down to this one, each followed by its deployment's name when it has one."""
    chain: list[str] = []
    run_id: UUID | None = flow_run.id and UUID(str(flow_run.id))
    with get_client(sync_client=True) as client:
        while run_id is not None:
            run = client.read_flow_run(run_id)
            names = [client.read_flow(run.flow_id).name]
            if run.deployment_id is not None:
                names.append(client.read_deployment(run.deployment_id).name)
            chain = names + chain
            run_id = client.read_task_run(run.parent_task_run_id).flow_run_id if run.parent_task_run_id else None
    return chain
