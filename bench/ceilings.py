"""The two ceilings an end-to-end run is judged against: DALI decode + resize + crop + normalize alone (the same
graph a2k's decoder builds, fed encoded bytes from memory), and the model alone on device-resident random input."""

from __future__ import annotations

import math
import os
import time

import numpy as np
import torch

DECODE_PREFETCH_DEPTH = 2  # batches DALI works on ahead of the one being consumed


def _read_all(uris: list[str]) -> list[np.ndarray]:
    out = []
    for uri in uris:
        with open(uri, "rb") as f:
            out.append(np.frombuffer(f.read(), dtype=np.uint8))
    return out


def _build_pipeline(pre, device, batch_size: int, num_threads: int, hw_decoder_load: float):
    """tasks.images.decode's own graph (external source "encoded" -> decoders.image -> resize -> crop_mirror_normalize),
    asynchronous and pipelined with a prefetch queue, so the CPU and GPU stages of consecutive batches overlap."""
    from nvidia.dali import pipeline_def

    from tasks.images.decode import _image_pipeline

    pipe = pipeline_def(_image_pipeline)(
        pre, "mixed" if device.is_cuda else "cpu", None, hw_decoder_load,
        batch_size=batch_size, num_threads=num_threads, device_id=device.dali_device_id,
        prefetch_queue_depth=DECODE_PREFETCH_DEPTH, seed=0,
    )
    pipe.build()
    return pipe


def _to_torch(out, device) -> torch.Tensor:
    """The batch as a torch tensor on the device, as a2k's decoder hands it to the model."""
    dense = out.as_tensor()
    if device.is_cuda:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        target = torch.empty(dense.shape(), dtype=torch.float16, device=device.torch_device)
        feed_ndarray(dense, target, cuda_stream=torch.cuda.current_stream(device.torch_device))
        return target
    return torch.from_numpy(np.array(dense))


def _decode_stream(pipe, batches: list[list[np.ndarray]], device, warm: int) -> tuple[int, float]:
    """Feed every batch ahead by the prefetch depth and consume every output, as one stream; the first `warm`
    batches are warm-up. Returns (images decoded after warm-up, seconds they took)."""
    fed = 0
    for _ in range(min(DECODE_PREFETCH_DEPTH, len(batches))):
        pipe.feed_input("encoded", batches[fed])
        fed += 1
    pipe.schedule_run()
    done, t0 = 0, time.perf_counter()
    for i in range(len(batches)):
        if i == warm:
            if device.is_cuda:
                torch.cuda.synchronize(device.torch_device)
            done, t0 = 0, time.perf_counter()
        (out,) = pipe.outputs()
        done += len(_to_torch(out, device))
        if fed < len(batches):
            pipe.feed_input("encoded", batches[fed])
            fed += 1
            pipe.schedule_run()
    if device.is_cuda:
        torch.cuda.synchronize(device.torch_device)
    return done, time.perf_counter() - t0


def decode_ceiling(images_dir: str, model_dir: str, batch_size: int, device: str, loads: list[float],
                   num_threads: int | None, gpu_memory_gb: float | None) -> list[dict]:
    """Images/s of DALI decode alone over every listed file, bytes already in memory, once per hardware
    decoder load on CUDA (once on the CPU). The first 3 batches, fed again before the
    timed ones in the same stream, are warm-up."""
    from tasks.devices import resolve_device
    from bench.baselines import list_uris
    from tasks.classify.infer import limit_gpu_memory
    from tasks.models.entry import read_entry

    dev = resolve_device(device)
    _ballast = limit_gpu_memory(dev, gpu_memory_gb) if gpu_memory_gb and dev.is_cuda else None
    pre = read_entry(model_dir).preprocessing
    uris = list_uris(images_dir)
    blobs = _read_all(uris)
    batches = [blobs[i:i + batch_size] for i in range(0, len(blobs), batch_size)]
    threads = num_threads or os.cpu_count() or 1
    rows = []
    for load in (loads if dev.is_cuda else [None]):
        label = f"hw_decoder_load {load}" if dev.is_cuda else "DALI cpu"
        try:
            pipe = _build_pipeline(pre, dev, batch_size, threads, load if load is not None else 0.0)
            warm = min(3, len(batches))
            n, seconds = _decode_stream(pipe, batches[:warm] + batches, dev, warm)
            del pipe
            rows.append({"variant": label, "hw_decoder_load": load, "images": n, "seconds": seconds,
                         "notes": f"{'mixed' if dev.is_cuda else 'cpu'}, {threads} threads, external source fed "
                                  f"from memory, prefetch depth {DECODE_PREFETCH_DEPTH}"})
        except Exception as e:  # noqa: BLE001 - one failing variant is a row with its error; the others still run
            rows.append({"variant": label, "hw_decoder_load": load, "error": f"{type(e).__name__}: {e}"})
    return rows


def model_ceiling(model_dir: str, batch_size: int, device: str, images: int, gpu_memory_gb: float | None,
                  max_seconds: float = 30.0) -> dict:
    """Images/s of the model's forward pass alone (with the softmax) on random device-resident input, run as a2k
    runs it (fp16 channels_last and a CUDA graph on CUDA where the model captures, fp32 eager on the CPU),
    after warm-up, timed between CUDA synchronizations. Runs about `images` images (at least 10 batches), or
    fewer batches (at least 3) once `max_seconds` have passed, as on a slow CPU; on out-of-memory the batch
    halves and the row says so. On CUDA the eager rate is measured too and given in the notes."""
    from bench.baselines import load_classifier

    classifier, _ballast = load_classifier(model_dir, device, gpu_memory_gb)
    dev = classifier.device
    shape = classifier.entry.preprocessing.input_shape
    size = batch_size
    while True:
        try:
            x = torch.randn(size, *shape, device=dev.torch_device).to(classifier.dtype)
            if dev.is_cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            iters = max(10, math.ceil(images / size))
            eager = _time_forward(classifier.probabilities, x, dev, iters, max_seconds) if dev.is_cuda else None
            graphed = classifier.capture(size)
            seconds, iters = _time_forward(classifier.probabilities, x, dev, iters, max_seconds)
            break
        except torch.cuda.OutOfMemoryError:
            if size == 1:
                raise
            classifier.graph = None
            torch.cuda.empty_cache()
            size //= 2
    precision = "fp16 channels_last" if dev.is_cuda else "fp32"
    how = "CUDA graph" if graphed else "eager"
    note = f"{precision}, {how}, {dev}, {torch.get_num_threads()} torch threads" + (
        f"; eager: {size * eager[1] / eager[0]:,.0f} images/s" if eager and graphed else "") + (
        f"; batch {batch_size} ran out of memory, measured at {size}" if size != batch_size else "")
    return {"images": size * iters, "seconds": seconds, "batch_size": size, "notes": note}


@torch.inference_mode()
def _time_forward(model, x: torch.Tensor, dev, iters: int, max_seconds: float) -> tuple[float, int]:
    for _ in range(5 if dev.is_cuda else 2):
        model(x)
    if dev.is_cuda:
        torch.cuda.synchronize(dev.torch_device)
    t0 = time.perf_counter()
    done = 0
    while done < iters and (done < 3 or time.perf_counter() - t0 < max_seconds):
        model(x)
        done += 1
    if dev.is_cuda:
        torch.cuda.synchronize(dev.torch_device)
    return time.perf_counter() - t0, done
