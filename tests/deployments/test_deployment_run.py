"""The deployments for real: `prefect server start` (SQLite), `python deployments/serve.py`, then
`prefect deployment run ... --watch` through the CLI, and `prefect deploy` of deployments/prefect.yaml."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import httpx
import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
NIGHTLY = "classify-images/nightly"
ALL_DEPLOYMENTS = ["classify-images/nightly", "train-model/on-demand", "compress-model/on-demand",
                   "evaluate-model/on-demand"]


def _prefect() -> list[str]:
    """The `prefect` command of this interpreter's environment, as a user types it."""
    exe = shutil.which("prefect", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "prefect"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process started in its own session, with everything it started (flow-run subprocesses)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
    try:  # children that outlived their parent in the same process group
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait_for(condition, what: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what}: the process exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        if condition():
            return
        time.sleep(0.5)
    pytest.fail(f"{what}: not ready after {timeout:.0f} s:\n{log.read_text()[-4000:]}")


class Server:
    """A `prefect server start` process and the environment that points CLI subprocesses at it."""

    def __init__(self, url: str, env: dict[str, str]):
        self.url, self.env = url, env
        self.http = httpx.Client(base_url=url, timeout=30)

    def deployment(self, name: str) -> dict:
        r = self.http.get(f"/deployments/name/{name}")
        r.raise_for_status()
        return r.json()

    def flow_run(self, run_id: str) -> dict:
        r = self.http.get(f"/flow_runs/{run_id}")
        r.raise_for_status()
        return r.json()

    def count_runs(self, deployment_id: str) -> int:
        r = self.http.post("/flow_runs/count", json={"flow_runs": {"deployment_id": {"any_": [deployment_id]}}})
        r.raise_for_status()
        return r.json()

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        """Run `prefect ARGS` from the repository root against this server."""
        return subprocess.run([*_prefect(), *args], cwd=REPO, env=self.env, capture_output=True, text=True,
                              timeout=timeout)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    """`prefect server start` on a free port with a temporary SQLite PREFECT_HOME; the session's test harness
    configures only this process, so every subprocess gets this server's URL through its environment."""
    root = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({
        "PREFECT_HOME": str(root / "home"), "PREFECT_API_URL": url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1", "PREFECT_RUNNER_POLL_FREQUENCY": "2", "COLUMNS": "500",  # no wrapped CLI messages
        "A2K_HOME": str(root / "a2k-home"),
    })
    log = root / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen([*_prefect(), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def healthy() -> bool:
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait_for(healthy, "prefect server start", proc, log, timeout=150)
        yield Server(url, env)
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def served(server: Server) -> Server:
    """`python deployments/serve.py`, run from the repository root, serving all four deployments."""
    log = Path(server.env["PREFECT_HOME"]).parent / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "deployments/serve.py"], cwd=REPO, env=server.env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(lambda: "being served" in log.read_text(), "deployments/serve.py", proc, log, timeout=120)
        yield server
    finally:
        _stop(proc)


def _run_id(cli_output: str) -> str:
    match = re.search(r"UUID: ([0-9a-f-]{36})", cli_output)
    assert match, f"no flow run id in:\n{cli_output}"
    return match.group(1)


def test_a_served_nightly_run_from_the_cli_classifies_every_photo_once(served, photos_dir, seed_model_dir, tmp_path):
    out = tmp_path / "predictions"
    done = served.cli("deployment", "run", NIGHTLY, "--param", f"input={photos_dir}", "--param", f"output={out}",
                      "--param", f"model={seed_model_dir}", "--param", "device=cpu", "--param", "shard_size=4",
                      "--watch", "--watch-timeout", "150")
    assert done.returncode == 0 and "finished successfully in 'Completed'" in done.stdout, done.stdout + done.stderr

    run = served.flow_run(_run_id(done.stdout))
    assert run["deployment_id"] == served.deployment(NIGHTLY)["id"] and run["state_type"] == "COMPLETED"
    # --param values reached the flow with their JSON types: shard_size is the integer 4
    assert run["parameters"]["shard_size"] == 4 and run["parameters"]["input"] == str(photos_dir)

    photos = sorted(p.resolve() for p in photos_dir.rglob("*") if p.is_file())
    df = pd.read_parquet(out)
    assert sorted(df["image_uri"]) == sorted(str(p) for p in photos)  # each image exactly once
    assert dict(zip(df["image_uri"], df["true_label"])) == {str(p): p.parent.name for p in photos}
    assert set(df["label"]) <= {"birds", "fish"} and set(df["model_name"]) == {"seed"}
    assert set(df["run_id"]) == {run["id"]}
    assert len(list(out.glob("part-*.parquet"))) == 3  # 9 images in shards of 4
    counts = duckdb.sql(f"select label, count(*) from '{out}/*.parquet' group by 1").fetchall()
    assert sum(n for _, n in counts) == len(photos)
    artifacts = served.http.post("/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
    keys = {a["key"] for a in artifacts.json()}  # keyed by the deployment, not those of a plain classify run
    assert {"classify-images-nightly-summary", "classify-images-nightly-shards"} <= keys, keys


@pytest.mark.parametrize(("value", "reason"), [
    ("abc", "'abc' is not"),  # "... of type 'integer'", or "... valid under any of the given schemas" for int | None
    ("0", "0 is less than the minimum of 1"),
])
def test_a_parameter_of_the_wrong_type_is_refused_before_any_run(served, value, reason, tmp_path):
    deployment_id = served.deployment(NIGHTLY)["id"]
    before = served.count_runs(deployment_id)
    done = served.cli("deployment", "run", NIGHTLY, "--param", f"batch_size={value}",
                      "--param", f"output={tmp_path / 'out'}", "--watch", "--watch-timeout", "60")
    printed = " ".join((done.stdout + done.stderr).split())
    assert done.returncode != 0, printed
    assert f"Validation failed for field 'batch_size'. Failure reason: {reason}" in printed
    assert served.count_runs(deployment_id) == before  # refused by the server: no run, no default used
    assert not (tmp_path / "out").exists()


def test_a_value_the_flow_refuses_fails_the_run_and_names_the_value(served, photos_dir, seed_model_dir, tmp_path):
    out = tmp_path / "predictions"
    done = served.cli("deployment", "run", NIGHTLY, "--param", f"input={photos_dir}", "--param", f"output={out}",
                      "--param", f"model={seed_model_dir}", "--param", "device=gpu2",
                      "--watch", "--watch-timeout", "150")
    assert done.returncode == 1 and "finished in state 'Failed'" in done.stdout, done.stdout + done.stderr
    state = served.flow_run(_run_id(done.stdout))["state"]
    assert state["type"] == "FAILED"
    assert "device 'gpu2' is not one of: auto, cpu, cuda, cuda:N" in state["message"]
    assert not out.exists()  # stopped before any work


def test_serve_script_and_prefect_yaml_declare_the_same_deployments(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delenv("PREFECT_LOGGING_EXTRA_LOGGERS", raising=False)  # serve.py sets it; restored after
    import runpy

    served = runpy.run_path(str(REPO / "deployments" / "serve.py"))["a2k_deployments"]()
    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())

    def from_yaml(d: dict) -> tuple:
        path, func = d["entrypoint"].split(":")
        module = path.removesuffix(".py").replace("/", ".")
        schedules = [(s["cron"], s["timezone"], s["active"]) for s in d.get("schedules") or []]
        return f"{module}.{func}", d["name"], schedules, d.get("parameters") or {}, d["tags"]

    def from_serve(d) -> tuple:
        schedules = [(s.schedule.cron, s.schedule.timezone, s.active) for s in d.schedules or []]
        return d.entrypoint, d.name, schedules, d.parameters, d.tags

    assert sorted(map(from_serve, served), key=str) == sorted(map(from_yaml, spec["deployments"]), key=str)
    assert [f"{d.flow_name}/{d.name}" for d in served] == ALL_DEPLOYMENTS


def test_prefect_deploy_of_the_yaml_creates_the_four_deployments_on_the_pool(server):
    # after the served tests: deploying gives the same names a work pool and a pull step
    created = server.cli("work-pool", "create", "a2k-gpu", "--type", "process", "--overwrite")
    assert created.returncode == 0, created.stdout + created.stderr
    deployed = server.cli("deploy", "--prefect-file", "deployments/prefect.yaml", "--all")
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr

    for name in ALL_DEPLOYMENTS:
        d = server.deployment(name)
        assert d["work_pool_name"] == "a2k-gpu"
        # workers run the flows from the folder `prefect deploy` ran in, where the entry points are
        assert d["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
        assert (REPO / d["entrypoint"].split(":")[0]).is_file()
    nightly = server.deployment(NIGHTLY)
    assert [(s["schedule"]["cron"], s["schedule"]["timezone"]) for s in nightly["schedules"]] == [("0 2 * * *", "UTC")]
    assert set(nightly["parameters"]) == {"input", "output", "model"}
    # the server checks --param values against the flow's signature (see the refusal test above)
    assert nightly["enforce_parameter_schema"] is True
    assert nightly["parameter_openapi_schema"]["properties"]["shard_size"]["minimum"] == 1
