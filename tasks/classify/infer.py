"""Run a model on decoded batches: fp16 channels_last on CUDA, top-k on the device, out-of-memory back-off,
a GPU memory cap for emulating a small card, and the batch size that fits a memory budget."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from tasks.devices import Device
from tasks.models.compiled import CompiledModel
from tasks.models.entry import load_model
from tasks.targets import sm_share_stream
from tasks.images.preprocess import Preprocessing

log = logging.getLogger(__name__)

MAX_AUTO_BATCH = 256  # larger batches add memory and latency, not speed: ResNet-50 fp16 is flat past ~128
CPU_BATCH = 64
# What DALI holds per image of a batch besides the model's input: the decoded picture before resize (a
# 500x375 RGB photo is 0.56 MB; larger photos more), resize buffers and nvJPEG's staging, with slack.
DALI_BYTES_PER_IMAGE = 8 * 2**20
DALI_FIXED_BYTES = 512 * 2**20  # nvJPEG handles, DALI's pools and its CUDA context share
# Model inputs alive at once in a classify run: DALI's stream queue (decode.STREAM_DEPTH = 2), decoded batches
# waiting for the model (classify.DECODE_AHEAD = 2, and as many of the next shard's while the model finishes a
# shard), one being handed over and one in the model.
INPUT_BATCHES_IN_FLIGHT = 8


def fold_batch_norms(model: torch.nn.Module, input_shape: tuple[int, ...], name: str = "the model") -> torch.nn.Module:
    """`model` with each inference-mode BatchNorm that directly follows a convolution or linear layer folded into
    that layer's weights and bias (torch.fx's `fuse`): the same function with one kernel and one pass over the
    activations less per pair (ResNet-50 has 53). Computed in fp32, before any cast to fp16. The folded model's
    output is checked against the original's on a random batch; where the model cannot be traced, or the outputs
    differ, the original is kept and the log says why."""
    before = _batch_norms(model)
    if not before:
        return model
    from torch.fx.experimental.optimization import fuse

    try:
        folded = fuse(model).eval()
    except Exception as e:  # noqa: BLE001 - a model fx cannot trace runs as it is, which is correct
        log.info("%s runs with its batch norms as they are: it cannot be traced to fold them (%s: %s)", name,
                 type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        return model
    x = torch.randn((2, *input_shape), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected, got = model(x), folded(x)
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-3, atol=1e-3):
        log.warning("%s runs with its batch norms as they are: folded into the layers before them, its output "
                    "changed (largest difference %.3g)", name, (got - expected).abs().max().item()
                    if got.shape == expected.shape else float("nan"))
        return model
    log.info("%s: %d of %d batch norms folded into the layers before them", name, before - _batch_norms(folded),
             before)
    return folded


def _batch_norms(model: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


class Classifier:
    """A loaded model on its device: fp16 and channels_last on CUDA; fp32 on the CPU, with its batch norms folded
    into the layers before them there (`fold_batch_norms`). On CUDA they are not folded: the folded convolutions'
    bias add is slower than the batch norm in fp16 channels_last (bench/NOTES.md, variant 19). `compile_mode` (CUDA only) runs the model through
    `torch.compile` with that mode, its weights frozen as constants."""

    def __init__(self, model_dir: str, device: Device, fold: bool = True, compile_mode: str | None = None,
                 model_sms: int | None = None) -> None:
        self.entry, model = load_model(model_dir, device)
        self.device = device
        # a model compiled ahead of time (AOTInductor) comes on its device, in its dtype and layout, for one batch
        self.compiled_batch = model.batch_size if isinstance(model, CompiledModel) else None
        if isinstance(model, CompiledModel):
            self.dtype = model.dtype
        else:
            if fold and not device.is_cuda:
                model = fold_batch_norms(model, self.entry.preprocessing.input_shape, self.entry.name)
            self.dtype = torch.float16 if device.is_cuda else torch.float32
            model = model.to(device.torch_device, dtype=self.dtype)
            if device.is_cuda:
                model = model.to(memory_format=torch.channels_last)
                if compile_mode:
                    from torch._inductor import config as inductor

                    inductor.freezing = True  # weights as constants: batch norms folded, epilogues fused
                    model = torch.compile(model, mode=compile_mode, dynamic=False)
        self.model = model  # load_model returns it ready for inference
        # the model's own CUDA stream; with `model_sms`, on that many SMs of the card only (a green context), as a
        # smaller card would run it (tasks.targets.plan_budget)
        self.green_context, self.stream = None, None
        if device.is_cuda:
            if model_sms:
                self.green_context, self.stream = sm_share_stream(device, model_sms)
                log.info("%s runs on %d SMs of %s (a green context)", self.entry.name, model_sms, device)
            else:
                self.stream = torch.cuda.Stream(device.torch_device)
        self.class_names = np.asarray(self.entry.class_names, dtype=object)
        self.max_forward: int | None = None  # lowered when the GPU runs out of memory, kept for later batches
        self.graph: CudaGraphForward | None = None

    def capture(self, batch_size: int) -> bool:
        """Record the forward pass at `batch_size` as a CUDA graph, replayed for every batch of up to that many
        images: one launch a batch instead of one per layer, and no Python between layers to hold the GIL
        the read and decode threads need. False, with the reason logged, where the model cannot be captured
        (it then runs eagerly). Call it before other threads use the GPU."""
        if not self.device.is_cuda:
            return False
        example = torch.zeros((batch_size, *self.entry.preprocessing.input_shape), dtype=self.dtype,
                              device=self.device.torch_device).contiguous(memory_format=torch.channels_last)
        try:
            self.graph = CudaGraphForward(self.model, example, self.stream)
        except Exception as e:  # noqa: BLE001 - any capture failure leaves the eager model, which is correct
            self.graph = None
            log.warning("%s runs eagerly: its forward pass could not be captured as a CUDA graph at batch %d "
                        "(%s: %s)", self.entry.name, batch_size, type(e).__name__, str(e).splitlines()[0][:300])
        torch.cuda.empty_cache()  # the warm-up's activations; the graph keeps its own pool
        return self.graph is not None

    @torch.inference_mode()
    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax over the classes, fp32, for a batch on the device in the model's dtype and layout. From the
        CUDA graph the result is a view of its output: read it before the next batch."""
        if self.graph is not None and len(x) <= self.graph.batch_size:
            return self.graph(x)
        return self.model(x).float().softmax(dim=1)

    def top_k(self, images: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Softmax probabilities and class indices of the k best classes, computed on the device.

        On GPU out-of-memory the batch is run in halves (and so on), and the smaller size is kept.
        """
        n = len(images)
        size = min(self.max_forward or n, n)
        while True:
            try:
                parts = [self._top_k(images[i : i + size], k) for i in range(0, n, size)]
                break
            except torch.cuda.OutOfMemoryError:
                if size == 1:
                    raise
                torch.cuda.empty_cache()
                log.warning("GPU out of memory running %s on %d images at once; continuing with %d",
                            self.entry.name, size, size // 2)
                size = self.max_forward = size // 2
        if len(parts) == 1:
            return parts[0]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    @torch.inference_mode()
    def _top_k(self, images: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.stream is None:
            return self._top_k_here(images, k)
        self.stream.wait_stream(torch.cuda.current_stream(self.device.torch_device))  # the images' producer
        with torch.cuda.stream(self.stream):  # a no-op when the caller is on it already (the shard worker)
            return self._top_k_here(images, k)

    def _top_k_here(self, images: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        x = images.to(self.device.torch_device, dtype=self.dtype, non_blocking=True)
        if self.device.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        probs = self.probabilities(x)
        scores, indices = probs.topk(min(k, probs.shape[1]), dim=1)
        if not self.device.is_cuda:
            return scores.numpy(), indices.numpy()
        # copied into pinned memory behind the forward pass, then waited for on an event (with the GIL released),
        # instead of `.cpu()`, a copy into pageable memory that waits inside the driver for the forward pass
        scores, indices = scores.to("cpu", non_blocking=True), indices.to("cpu", non_blocking=True)
        # blocking: the thread sleeps in the driver rather than spinning a core that DALI's Huffman decoding and the
        # readers could use (bench/NOTES.md, variant 20: the shard thread's CPU 2.5 s -> 0.25 s per 40,960 images)
        done = torch.cuda.Event(blocking=True)
        done.record()
        done.synchronize()
        return scores.numpy(), indices.numpy()

    @torch.inference_mode()
    def activation_bytes_per_image(self, pre: Preprocessing, probe: int = 8) -> int:
        """Peak GPU memory one more image adds to a forward pass, measured at two batch sizes."""
        peaks = []
        for n in (probe, 2 * probe):
            x = torch.zeros((n, *pre.input_shape), dtype=self.dtype, device=self.device.torch_device)
            torch.cuda.synchronize(self.device.torch_device)
            torch.cuda.reset_peak_memory_stats(self.device.torch_device)
            base = torch.cuda.memory_allocated(self.device.torch_device)
            self.model(x.contiguous(memory_format=torch.channels_last)).float().softmax(dim=1)
            torch.cuda.synchronize(self.device.torch_device)
            peaks.append(torch.cuda.max_memory_allocated(self.device.torch_device) - base)
            del x
        return max(1, (peaks[1] - peaks[0]) // probe)


class CudaGraphForward:
    """`model(x).float().softmax(1)` recorded once as a CUDA graph for inputs shaped like `example`; a smaller
    batch is copied into the head of the static input and the head of the output is returned."""

    def __init__(self, model: torch.nn.Module, example: torch.Tensor, stream: torch.cuda.Stream | None = None) -> None:
        self.batch_size = len(example)
        self.static_in = example.clone()
        with torch.inference_mode():
            # recorded on the stream it is replayed on: a green context's stream keeps its kernels on its SMs
            side = stream or torch.cuda.Stream(example.device)
            side.wait_stream(torch.cuda.current_stream(example.device))
            with torch.cuda.stream(side):  # warm-up outside the capture: cuDNN picks its algorithms here
                for _ in range(2):
                    model(self.static_in)
                # a host synchronization inside a capture invalidates it and leaves the CUDA RNG stuck in capture
                # state for the rest of the process: find one here, where it is only an exception
                previous = torch.cuda.get_sync_debug_mode()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    model(self.static_in)
                finally:
                    torch.cuda.set_sync_debug_mode(previous)
            torch.cuda.current_stream(example.device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: DALI's own threads may call the CUDA API while this thread captures
            with torch.cuda.graph(self.graph, stream=side, capture_error_mode="thread_local"):
                self.static_out = model(self.static_in).float().softmax(dim=1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        self.static_in[:n].copy_(x)
        self.graph.replay()
        return self.static_out[:n]


@dataclass(frozen=True)
class BatchFit:
    """How a batch size was chosen for a memory budget, for the log and the run's summary."""

    batch_size: int
    free_bytes: int
    model_bytes_per_image: int
    decode_bytes_per_image: int
    why: str = ""  # set where the batch is not fitted to memory

    def describe(self) -> str:
        if self.why:
            return f"batch {self.batch_size}: {self.why}"
        per_image = (self.model_bytes_per_image + self.decode_bytes_per_image) / 2**20
        return (f"batch {self.batch_size}: {self.free_bytes / 2**30:.2f} GiB free, about {per_image:.1f} MiB an image "
                f"({self.model_bytes_per_image / 2**20:.1f} model + {self.decode_bytes_per_image / 2**20:.1f} decode)")


def fit_batch_size(classifier: Classifier, pre: Preprocessing, max_batch: int = MAX_AUTO_BATCH) -> BatchFit:
    """The largest batch (a multiple of 8, at most `max_batch`) whose decode and forward pass fit in the GPU
    memory now free to this process, after DALI's fixed share. On the CPU: `CPU_BATCH`."""
    if classifier.compiled_batch:  # compiled for one batch shape: every other size is padded or cut to it
        return BatchFit(classifier.compiled_batch, 0, 0, 0, "the batch the model was compiled for")
    if not classifier.device.is_cuda:
        return BatchFit(min(CPU_BATCH, max_batch), 0, 0, 0, "on the CPU")
    per_model = classifier.activation_bytes_per_image(pre)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(classifier.device.torch_device)
    decode = DALI_BYTES_PER_IMAGE + INPUT_BATCHES_IN_FLIGHT * int(np.prod(pre.input_shape)) * 2  # fp16
    usable = int(0.85 * (free - DALI_FIXED_BYTES))
    fits = usable // (per_model + decode)
    if fits < 1:
        raise ValueError(f"not even one image fits: {free / 2**30:.2f} GiB free on {classifier.device}, "
                         f"{(per_model + decode) / 2**20:.0f} MiB needed per image beside "
                         f"{DALI_FIXED_BYTES / 2**20:.0f} MiB for DALI; give the run more GPU memory")
    size = min(max_batch, fits)
    return BatchFit(size if size < 8 else size - size % 8, free, per_model, decode)


def limit_gpu_memory(device: Device, budget_gb: float) -> torch.Tensor | None:
    """Leave only `budget_gb` of the card free for this process (model, activations and DALI's pools alike),
    to run as a smaller card would (e.g. 6 for an RTX A2000 6 GB): the rest is taken by one idle block."""
    if not device.is_cuda:
        raise ValueError(f"gpu_memory_gb {budget_gb} needs a CUDA device; the device is {device}")
    free, total = torch.cuda.mem_get_info(device.torch_device)
    budget = int(budget_gb * 2**30)
    if budget > free:
        raise ValueError(f"gpu_memory_gb {budget_gb} is more than the {free / 2**30:.1f} GiB free on {device} "
                         f"({total / 2**30:.1f} GiB in all)")
    ballast = torch.empty(free - budget, dtype=torch.uint8, device=device.torch_device)
    log.info("GPU memory limited to %.1f GiB of %.1f GiB free on %s", budget_gb, free / 2**30, device)
    return ballast
