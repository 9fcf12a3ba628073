"""The terminal's progress display: images done of N, images/s and ETA on a terminal (a real pty), nothing in a pipe;
and the steps the flows report to it."""

import os
import pty
import re
import select
import subprocess
import sys

from tasks.devices import resolve_device
from tasks.images.manifest import list_images
from tasks.models.entry import default_preprocessing
from tasks.progress import shown_by
from tasks.train.train import TrainConfig, split_manifest, train_classifier


def _env(tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "A2K_"))}
    return {**env, "PREFECT_HOME": str(tmp_path / "prefect"), "A2K_HOME": str(tmp_path / "a2k"), "COLUMNS": "160",
            "TERM": "xterm"}


def _in_a_terminal(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Runs argv with stdout and stderr on a pseudo-terminal, as in a user's terminal; its exit code and what the
    terminal got."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdout=slave, stderr=slave, stdin=subprocess.DEVNULL, env=env,
                            close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 600)
        if not ready:
            proc.kill()
            break
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=60), b"".join(chunks).decode(errors="replace")


def test_classify_in_a_terminal_shows_images_done_of_n_with_speed_and_eta(tmp_path, photos_dir, seed_model_dir):
    code, screen = _in_a_terminal([sys.executable, "-m", "a2k", "classify", str(photos_dir), str(tmp_path / "out"),
                                   "--model", str(seed_model_dir), "--device", "cpu", "--shard-size", "4"],
                                  _env(tmp_path))
    assert code == 0, screen
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)  # without the terminal's cursor and colour codes
    assert re.search(r"classify\b.*\b9 of 9 images\b.*\bimages/s\b.*\bETA\b", text), text
    assert "9 predicted, 0 errors of 9 images" in text
    # Prefect's log lines are printed above the bar, each on a line of its own, not across it
    lines = re.split(r"[\r\n]+", text)
    assert any("| INFO" in line for line in lines) and not any("| INFO" in x and "ETA" in x for x in lines), text


def test_classify_in_a_pipe_shows_no_progress(tmp_path, photos_dir, seed_model_dir):
    out = subprocess.run([sys.executable, "-m", "a2k", "classify", str(photos_dir), str(tmp_path / "out"), "--model",
                          str(seed_model_dir), "--device", "cpu", "--shard-size", "4"], capture_output=True,
                         text=True, env=_env(tmp_path), timeout=600)
    assert out.returncode == 0, out.stderr
    assert "9 predicted, 0 errors of 9 images" in out.stdout
    assert "of 9 images" not in out.stdout.replace("errors of 9 images", "") and "ETA" not in out.stdout


class Recorded:
    """A tasks.progress view that keeps what it is told (the terminal's view draws the same calls)."""

    def __init__(self) -> None:
        self.steps: dict[int, dict] = {}

    def start(self, what: str, total: int) -> int:
        self.steps[len(self.steps)] = {"what": what, "total": total, "done": 0, "finished": False}
        return len(self.steps) - 1

    def advance(self, step: int, n: int) -> None:
        self.steps[step]["done"] += n

    def reach(self, step: int, done: int) -> None:
        self.steps[step]["done"] = max(self.steps[step]["done"], done)

    def finish(self, step: int) -> None:
        self.steps[step]["finished"] = True


def test_training_reports_every_training_image_of_every_epoch(digits_dir):
    splits = split_manifest(list_images(str(digits_dir)), 0.15, 0.15, seed=0)
    # a few of every class (the splits are in class order)
    sizes = {"train": 60, "val": 20, "test": 20}
    splits = {name: t.take(list(range(0, t.num_rows, t.num_rows // sizes[name]))[:sizes[name]])
              for name, t in splits.items()}
    view = Recorded()
    with shown_by(view):
        train_classifier(splits, "seed-cnn", default_preprocessing("seed-cnn"), TrainConfig(epochs=2, batch_size=16),
                         resolve_device("cpu"))
    assert list(view.steps.values()) == [{"what": "train (2 epochs)", "total": 120, "done": 120, "finished": True}]
