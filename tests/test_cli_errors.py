"""Every command's bad input: one line `a2k: error: ...` naming the value and what is allowed, before Prefect is
loaded (so no server starts), no traceback; `--debug` shows the traceback; a deployment run's failed state says the
same sentence."""

import os
import subprocess
import sys

import pytest

from a2k.cli import refusal_line
from flows.train_model import train_model

_RUN = ("import sys; from a2k.cli import main; rc = main(sys.argv[1:]); "
        "print('loaded', sorted(m for m in ('prefect', 'nvidia.dali') if m in sys.modules)); sys.exit(rc)")


def _env(tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "A2K_"))}
    return {**env, "A2K_HOME": str(tmp_path / "a2k"), "PREFECT_HOME": str(tmp_path / "prefect")}


def _refused(tmp_path, argv: list[str]) -> str:
    """Runs `a2k ARGV` in a fresh process; its one error line (asserted to be the only output on stderr)."""
    env = _env(tmp_path)
    out = subprocess.run([sys.executable, "-c", _RUN, *argv], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "loaded []" in out.stdout  # refused before Prefect (and its server) or DALI were loaded
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("a2k: error: "), out.stderr
    return lines[0].removeprefix("a2k: error: ")


@pytest.fixture
def places(tmp_path, photos_dir, seed_model_dir) -> dict[str, str]:
    (tmp_path / "a-file").write_text("x")
    return {"PHOTOS": str(photos_dir), "MODEL": str(seed_model_dir), "FILE": str(tmp_path / "a-file"),
            "OUT": str(tmp_path / "out"), "MISSING": str(tmp_path / "missing")}


CASES = [
    ("classify MISSING OUT --model MODEL", "input '{MISSING}' does not exist; give a folder of images or a .parquet "
                                           "manifest"),
    ("classify PHOTOS OUT --model MODEL --batch-size 0",
     "--batch-size '0': Input should be greater than or equal to 1"),
    ("classify PHOTOS OUT --model MODEL --device gpu2", "--device 'gpu2': device 'gpu2' is not one of: auto, cpu, "
                                                        "cuda, cuda:N"),
    ("classify PHOTOS OUT --model nomodel", "model 'nomodel' is not in the registry '{A2K}/models'; models: none"),
    ("classify PHOTOS OUT --model models:/nomodel/1", "model 'nomodel' is not in the registry"),
    ("classify PHOTOS OUT --model MISSING", "model '{MISSING}' is neither a model folder (no model.json in it) nor a "
                                            "registry reference; give models:/NAME/VERSION, models:/NAME@ALIAS, NAME "
                                            "or a model folder"),
    ("classify PHOTOS FILE --model MODEL", "output '{FILE}' exists and is not a folder"),
    ("train MISSING --name x", "dataset '{MISSING}' is not a folder; lay it out as <root>/<class>/<file>"),
    ("train PHOTOS --name x --batch-size 0", "--batch-size '0': Input should be greater than or equal to 1"),
    ("train PHOTOS --name x --device gpu2", "--device 'gpu2': device 'gpu2' is not one of"),
    ("train PHOTOS --name x --arch nonet", "architecture 'nonet' is not known (no close match); give one of: "),
    ("train PHOTOS --name ../x", "model name '../x' is not allowed; use 1-128 letters"),
    ("evaluate nomodel", "model 'nomodel' is not in the registry '{A2K}/models'; models: none"),
    ("evaluate MODEL MISSING", "input '{MISSING}' does not exist"),
    ("evaluate MODEL --device gpu2", "--device 'gpu2': device 'gpu2' is not one of"),
    ("evaluate MODEL --batch-size 0", "--batch-size 0: Input should be greater than or equal to 1"),
    ("compress nomodel --recipe fp16", "model 'nomodel' is not in the registry"),
    ("compress MODEL --recipe nothing", "recipe 'nothing' is not known; allowed: "),
    ("compress MODEL --recipe fp16 --device gpu2", "--device 'gpu2': device 'gpu2' is not one of"),
    ("compress MODEL --recipe fp16 --batch-size 0", "--batch-size 0: Input should be greater than or equal to 1"),
    ("compress MODEL --recipe fp16 --alias ../a", "alias '../a'"),
    ("models import MISSING --name x --labels FILE", "source '{MISSING}' is not a file; give a .safetensors or .pth "
                                                     "state dict"),
    ("models import FILE --name x --labels MISSING", "labels file '{MISSING}' is not a file; give a file of class "
                                                     "names"),
    ("models show nomodel", "model 'nomodel' is not in the registry"),
    ("models promote nomodel", "model 'nomodel' is not in the registry"),
    ("tune MISSING", "input '{MISSING}' is not a folder"),
    ("tune PHOTOS --device gpu2", "device 'gpu2' is not one of: auto, cpu, cuda, cuda:N"),
    ("demo --device gpu2", "--device 'gpu2': device 'gpu2' is not one of"),
    ("demo --epochs 0", "--epochs '0': Input should be greater than or equal to 1"),
]


@pytest.mark.parametrize("command, message", CASES, ids=[c for c, _ in CASES])
def test_bad_input_is_one_line_before_prefect_loads(tmp_path, places, command, message):
    argv = [places.get(word, word) for word in command.split()]
    line = _refused(tmp_path, argv)
    assert message.format(**places, A2K=tmp_path / "a2k") in line


def test_debug_shows_the_traceback_before_the_line(tmp_path):
    env = _env(tmp_path)
    out = subprocess.run([sys.executable, "-m", "a2k", "evaluate", "nomodel", "--debug"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 2 and out.stderr.startswith("Traceback (most recent call last):")
    assert out.stderr.splitlines()[-1] == (f"a2k: error: model 'nomodel' is not in the registry "
                                           f"'{tmp_path / 'a2k'}/models'; models: none")


def test_a_flow_parameter_is_named_as_the_cli_spells_it():
    """tasks' messages name a flow's parameter (`overwrite=True`, right in a deployment run); the CLI says its flag."""
    e = ValueError("output '/o' holds parts of another run; choose an empty output or pass overwrite=True to "
                   "replace them (or run with full=True)")
    assert refusal_line(e) == ("output '/o' holds parts of another run; choose an empty output or pass --overwrite "
                               "to replace them (or run with --full)")


def test_a_deployment_run_fails_with_the_same_sentence(tmp_path):
    """What the CLI prints is the failed state's message of the flow run (as `prefect deployment run` starts it)."""
    state = train_model(dataset=str(tmp_path / "missing"), name="x", return_state=True)
    assert state.is_failed()
    assert state.message == (f"Flow run encountered an exception: ValueError: dataset '{tmp_path / 'missing'}' is "
                             "not a folder; lay it out as <root>/<class>/<file>")


def test_a_refusal_found_inside_a_run_is_logged_without_its_traceback(tmp_path, seed_model_dir):
    """What only the run can check (weights that do not fit their labels) fails the run; Prefect's log says so in
    its lines, and the CLI in its one line, with no traceback between them."""
    (tmp_path / "labels.txt").write_text("a\nb\nc\n")
    out = subprocess.run([sys.executable, "-m", "a2k", "models", "import", str(seed_model_dir / "weights.safetensors"),
                          "--name", "x", "--labels", str(tmp_path / "labels.txt"), "--arch", "seed-cnn"],
                         capture_output=True, text=True, env=_env(tmp_path), timeout=600)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "Finished in state Failed" in out.stderr
    errors = [x for x in out.stderr.splitlines() if x.startswith("a2k: error: ")]
    assert len(errors) == 1 and "does not fit seed-cnn with 3 classes: shape mismatch" in errors[0], out.stderr
