"""The flow commands' options come from the flows' signatures: one parameter list, checked before any Prefect work."""

import inspect
import os
import subprocess
import sys
import time
import typing

import pyarrow.parquet as pq
import pytest

from a2k.cli import FLOWS, main
from a2k.cli_flows import flow_parameters


@pytest.mark.parametrize("command", sorted(FLOWS))
def test_the_signature_read_from_the_source_is_the_flow_s_own(command):
    """The CLI reads a flow's signature without importing the flow; it must be what Prefect sees."""
    spec = FLOWS[command][0]
    fn = spec.load().fn
    hints = typing.get_type_hints(fn, include_extras=True)
    real = [(name, hints[name], p.default) for name, p in inspect.signature(fn).parameters.items()]
    assert list(flow_parameters(spec)) == real


@pytest.mark.parametrize("command", sorted(FLOWS))
def test_every_flow_parameter_is_an_option_with_its_default(capsys, command):
    spec, positional, _ = FLOWS[command]
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, p in inspect.signature(spec.load().fn).parameters.items():
        if name in positional:
            assert f" {name} " in text
            continue
        assert f"--{name.replace('_', '-')}" in text
        if p.default not in (None, False, inspect.Parameter.empty):
            assert f"(default: {getattr(p.default, 'value', p.default)})" in text, name


def test_classify_help_says_what_each_option_means(capsys):
    with pytest.raises(SystemExit):
        main(["classify", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "images per shard (one task and one Parquet part each) (default: 4096)" in text
    assert "NAME (= NAME@production)" in text and "s3://bucket/prefix" in text


@pytest.mark.parametrize("option, value, message", [
    ("--top-k", "0", "--top-k '0': Input should be greater than or equal to 1"),
    ("--shard-size", "many",
     "--shard-size 'many': Input should be a valid integer, unable to parse string as an integer"),
    ("--device", "gpu2", "--device 'gpu2': device 'gpu2' is not one of: auto, cpu, cuda, cuda:N"),
])
def test_a_bad_option_is_one_line_naming_it_before_any_work(capsys, tmp_path, option, value, message):
    code = main(["classify", str(tmp_path), str(tmp_path / "out"), "--model", "m", option, value])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == f"a2k: error: {message}"
    assert not (tmp_path / "out").exists()


def _prefect_env(tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, "PREFECT_HOME": str(tmp_path / "prefect"), "A2K_HOME": str(tmp_path / "a2k")}


def test_a_fresh_process_refuses_a_bad_argument_without_loading_prefect_or_torch(tmp_path):
    """Checked from the flow's source: the process never imports what a run needs (seconds of imports)."""
    code = ("import sys; from a2k.cli import main; rc = main(sys.argv[1:]); "
            "print('loaded', sorted(m for m in ('prefect', 'torch', 'nvidia.dali') if m in sys.modules)); "
            "sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, "classify", str(tmp_path), str(tmp_path / "out"), "--model",
                          "m", "--batch-size", "0"], capture_output=True, text=True, env=_prefect_env(tmp_path),
                         timeout=120)
    assert out.returncode == 2 and "a2k: error: --batch-size '0'" in out.stderr
    assert "loaded []" in out.stdout


def test_a_fresh_process_classifies_with_its_own_temporary_server_and_leaves_nothing_running(
        tmp_path, photos_dir, seed_model_dir):
    """The CLI starts Prefect's temporary server itself, beside the imports and the model, and says where the
    start-up went; when it exits, its server goes too."""
    proc = subprocess.Popen([sys.executable, "-m", "a2k", "classify", str(photos_dir), str(tmp_path / "out"),
                             "--model", str(seed_model_dir), "--device", "cpu"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_prefect_env(tmp_path), start_new_session=True)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    line = next(x for x in out.splitlines() if x.startswith("started:"))
    assert "server" in line and "(parallel" in line and "shard worker" in line and "first batch at" in line
    listed = len(list(photos_dir.rglob("*.*")))
    rows = pq.read_table(tmp_path / "out").num_rows
    errors = pq.read_table(tmp_path / "out" / "_errors").num_rows if (tmp_path / "out" / "_errors").exists() else 0
    assert rows + errors == listed and rows > 0
    left = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True)  # its session
    deadline = time.monotonic() + 10
    while left.stdout.strip() and time.monotonic() < deadline:
        time.sleep(0.2)
        left = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True)
    assert not left.stdout.strip(), f"still running after the CLI exited: {left.stdout}"
    # the temporary server runs in a session of its own (a terminal's Ctrl-C must reach the CLI alone): found by
    # the Prefect home it serves, which is this test's
    home = _prefect_env(tmp_path)["PREFECT_HOME"]
    while _servers_of(home) and time.monotonic() < deadline + 10:
        time.sleep(0.2)
    assert not _servers_of(home), "the CLI's temporary server outlived it"


def _servers_of(prefect_home: str) -> list[int]:
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "uvicorn" in " ".join(p.info["cmdline"] or ()) and p.environ().get("PREFECT_HOME") == prefect_home:
                if p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found
