import pytest

from tasks.devices import Device, resolve_device
from tasks.classify.plan import RunContext
from tasks.classify.shard import ShardClassifier
from tasks.images.manifest import list_images
from tasks.classify.sink import ERROR_SCHEMA, PREDICTION_SCHEMA

CTX = RunContext("seed", "1", "abc", "run-1", top_k=2)


@pytest.fixture
def labelled(photos_dir, truncated_jpeg):
    (photos_dir / "fish" / "cut.jpg").write_bytes(truncated_jpeg)
    (photos_dir / "fish" / "fake.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(500))
    (photos_dir / "fish" / "empty.png").write_bytes(b"")
    table = list_images(photos_dir)
    return table.column("uri").to_pylist(), table.column("label").to_pylist()


@pytest.mark.parametrize("batch_size", [1, 3, 4, 11, 64])
def test_every_image_lands_in_exactly_one_table_for_any_batch_size(seed_model_dir, labelled, batch_size):
    uris, labels = labelled
    worker = ShardClassifier(str(seed_model_dir), "cpu", batch_size, num_threads=2)
    predictions, errors, _ = worker.run(uris, labels, CTX)
    assert predictions.schema == PREDICTION_SCHEMA and errors.schema == ERROR_SCHEMA
    got = predictions.column("image_uri").to_pylist() + errors.column("image_uri").to_pylist()
    assert sorted(got) == sorted(uris) and len(got) == len(set(got)) == 12
    assert {u.rsplit("/", 1)[1]: k for u, k in zip(errors.column("image_uri").to_pylist(),
                                                    errors.column("kind").to_pylist())} == {
        "cut.jpg": "truncated", "fake.jpg": "not_an_image", "empty.png": "empty"}


def test_predictions_do_not_depend_on_the_batch_size(seed_model_dir, labelled):
    uris, labels = labelled
    runs = [ShardClassifier(str(seed_model_dir), "cpu", b, 2).run(uris, labels, CTX)[0] for b in (2, 7)]
    a, b = (r.select(["image_uri", "label", "topk_labels"]).to_pylist() for r in runs)
    assert a == b
    scores = [r.column("score").to_numpy() for r in runs]
    assert abs(scores[0] - scores[1]).max() < 1e-5


def test_shards_run_from_two_threads_on_one_worker_give_the_rows_of_one_batch(seed_model_dir, labelled):
    """Two shard tasks share a worker (the local runner runs two at a time): they overlap, and the read arenas,
    reused every few batches of 1, never hand a batch another's bytes."""
    from concurrent.futures import ThreadPoolExecutor

    from tasks.classify.shard import ARENAS, shard_classifier

    uris, labels = labelled
    assert len(uris) > ARENAS  # batches of 1 go round the arena ring twice
    reference = ShardClassifier(str(seed_model_dir), "cpu", len(uris), 2).run(uris, labels, CTX)[0]
    with ThreadPoolExecutor(2) as pool:
        workers = list(pool.map(lambda _: shard_classifier(str(seed_model_dir), "sha", "cpu", 1, 2, 0.65), range(2)))
        assert workers[0] is workers[1]  # built once
        runs = list(pool.map(lambda order: workers[0].run(order, labels if order == uris else labels[::-1], CTX)[0],
                             [uris, uris[::-1]]))
    shard_classifier.cache_clear()
    for run in runs:
        got = run.sort_by("image_uri")
        want = reference.sort_by("image_uri")
        assert got.column("image_uri").equals(want.column("image_uri"))
        assert got.column("label").equals(want.column("label"))
        assert abs(got.column("score").to_numpy() - want.column("score").to_numpy()).max() < 1e-5


def test_the_next_shard_is_read_and_decoded_while_the_model_finishes_the_shard_before(seed_model_dir, photos_dir):
    """The model waits on its last batch of the first shard until the second shard's decode stage has begun:
    with shards taking whole turns on the worker this would never happen."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    table = list_images(photos_dir)  # nine good photos
    uris, labels = table.column("uri").to_pylist(), table.column("label").to_pylist()
    worker = ShardClassifier(str(seed_model_dir), "cpu", 3, 2)
    batches_per_shard = -(-len(uris) // 3)
    second_shard_decoding = threading.Event()
    overlapped: list[bool] = []
    decode_stream, top_k = worker.decoder.decode_stream, worker.classifier.top_k
    streams, model_calls = [], []

    def spy_decode_stream(batches, *args, **kwargs):
        streams.append(1)
        if len(streams) == 2:
            second_shard_decoding.set()
        return decode_stream(batches, *args, **kwargs)

    def spy_top_k(images, k):
        model_calls.append(1)
        if len(model_calls) == batches_per_shard:  # the first shard's last batch
            overlapped.append(second_shard_decoding.wait(timeout=20))
            time.sleep(0.5)  # the second shard decodes meanwhile: its time is counted once, in the first
        return top_k(images, k)

    worker.decoder.decode_stream, worker.classifier.top_k = spy_decode_stream, spy_top_k
    start = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda args: worker.run(*args, CTX), [(uris, labels), (uris[::-1], labels[::-1])]))
    wall = time.perf_counter() - start
    assert overlapped == [True]
    assert sum(timing.seconds for *_, timing in runs) <= wall  # the shards' times add up to the busy time
    assert len(model_calls) == 2 * batches_per_shard
    for predictions, errors, timing in runs:
        assert sorted(predictions.column("image_uri").to_pylist()) == sorted(uris) and errors.num_rows == 0
        assert timing.seconds > 0


def test_rows_carry_true_label_topk_and_model_identity(seed_model_dir, labelled):
    uris, labels = labelled
    predictions, _, _ = ShardClassifier(str(seed_model_dir), "cpu", 4, 2).run(uris, labels, CTX)
    row = predictions.to_pylist()[0]
    assert row["true_label"] == "birds" and row["label"] == row["topk_labels"][0]
    assert len(row["topk_labels"]) == 2 and row["score"] == pytest.approx(row["topk_scores"][0])
    assert sorted(row["topk_labels"]) == ["birds", "fish"] and sum(row["topk_scores"]) == pytest.approx(1, abs=1e-5)
    assert (row["model_name"], row["model_version"], row["run_id"]) == ("seed", "1", "run-1")
    assert row["processed_at"].tzinfo is not None


def test_device_strings_are_checked():
    assert resolve_device("cpu") == Device("cpu")
    with pytest.raises(ValueError, match="device 'gpu2' is not one of: auto, cpu, cuda, cuda:N"):
        resolve_device("gpu2")
    with pytest.raises(ValueError, match=r"device 'cuda:7' not found; available: auto, cpu"):
        resolve_device("cuda:7")


@pytest.mark.gpu
def test_a_worker_on_a_gpu_says_when_cuda_started_before_a2k_set_its_queues(seed_model_dir):
    """CUDA_DEVICE_MAX_CONNECTIONS is read when CUDA starts: a process that started CUDA before importing a2k
    runs with the driver's 8 queues, and the worker says so (in a fresh process, where nothing started CUDA)."""
    import os
    import subprocess
    import sys

    script = ("import logging, sys, torch; torch.zeros(1, device='cuda'); import tasks; "
              "from tasks.classify.shard import ShardClassifier; logging.basicConfig(stream=sys.stdout); "
              "print('first', tasks.CUDA_STARTED_FIRST); ShardClassifier(sys.argv[1], 'cuda', 8, 2)")
    env = {k: v for k, v in os.environ.items() if k != "CUDA_DEVICE_MAX_CONNECTIONS"}
    late = subprocess.run([sys.executable, "-c", script, str(seed_model_dir)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert late.returncode == 0, late.stderr
    assert "first True" in late.stdout and "came too late" in late.stdout
    in_order = subprocess.run([sys.executable, "-c", script.replace("torch.zeros(1, device='cuda'); import tasks",
                                                                    "import tasks; torch.zeros(1, device='cuda')"),
                               str(seed_model_dir)], capture_output=True, text=True, env=env, timeout=300)
    assert in_order.returncode == 0, in_order.stderr
    assert "first False" in in_order.stdout and "came too late" not in in_order.stdout
