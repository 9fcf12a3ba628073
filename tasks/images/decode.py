"""Decode image bytes with NVIDIA DALI: one pipeline definition for GPU (mixed) and CPU.

Files DALI cannot read or would read differently from the Pillow reference go to Pillow, and when DALI
still fails on a batch, the batch is bisected until the failing files are isolated and every good file
is decoded. Reading and the header check that comes first are in `tasks.images.read`.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from tasks.devices import Device, is_out_of_memory
from tasks.images.formats import is_truncated, pillow_reason
from tasks.images.preprocess import Augmentation, Preprocessing, pil_preprocess
from tasks.images.read import DEFAULT_MAX_PIXELS, Blob, ErrorKind, Failure, load_blobs

log = logging.getLogger(__name__)


def _decode_with_pillow(data: bytes | memoryview, pre: Preprocessing, why: str) -> torch.Tensor | Failure:
    """Decode one file with Pillow (the reference path) if Pillow can, else say why it could not."""
    data = bytes(data)
    try:
        return pil_preprocess(data, pre)
    except Exception as e:  # noqa: BLE001 - any Pillow failure on bad data is an error row, not a crash
        if "truncated" in str(e).lower() or is_truncated(data):
            kind = ErrorKind.TRUNCATED
        elif isinstance(e, Image.UnidentifiedImageError):  # as the header check says of it
            kind = ErrorKind.NOT_AN_IMAGE
        else:
            kind = ErrorKind.CORRUPT
        return Failure(kind, f"cannot decode: {type(e).__name__}: {e}; {why}"[:500])


def _dali_reason(error: RuntimeError) -> str:
    """The line of a DALI pipeline error that names the failure (its reason itself goes to stderr)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    after = lines.index("encountered:") + 1 if "encountered:" in lines else len(lines) - 1
    return f"DALI: {lines[after]}" if lines else "DALI failed"


def _torchvision_size(images, size: int):
    """Output (height, width) that torchvision's Resize(size) gives: the shorter side becomes `size`
    and the longer one floor(size * long / short); DALI's own `resize_shorter` rounds instead."""
    from nvidia.dali import fn, math as dmath, types

    shape = fn.cast(images.shape(), dtype=types.FLOAT)  # HWC, on the CPU even for GPU images
    height, width = shape[0], shape[1]
    short = dmath.min(height, width)
    # + 1e-3 guards exact integers against float rounding below them
    return dmath.floor(height * size / short + 1e-3), dmath.floor(width * size / short + 1e-3)


def _torchvision_crop_pos(length, crop: int):
    """crop_pos for DALI that puts the crop where torchvision's CenterCrop does: at round((L - crop) / 2)
    with Python's round-half-to-even (DALI rounds halves up, one pixel off for odd margins)."""
    from nvidia.dali import math as dmath

    margin = dmath.max(length - crop, 0.0)
    half = dmath.floor(margin / 2)
    odd_margin = margin - 2 * half
    odd_half = half - 2 * dmath.floor(half / 2)
    return (half + odd_margin * odd_half) / dmath.max(margin, 1.0)


def _image_pipeline(pre: Preprocessing, decode_device: str, augment: Augmentation | None, hw_decoder_load: float):
    """The one DALI graph: encoded bytes -> decode -> resize shorter side -> crop -> normalize, CHW."""
    from nvidia.dali import fn, types

    # no_copy: DALI reads the encoded bytes where they lie (a read arena, shared memory, a bytes object) instead of
    # copying them in `feed_input`, which holds the GIL the other stages need (bench/NOTES.md, variant 18). Callers keep each batch's buffers unchanged until its output is taken: the read arenas come round
    # again only ARENAS batches later (tasks.classify.shard), and a stream batch holds its blobs until then.
    encoded = fn.external_source(name="encoded", dtype=types.UINT8, no_copy=True)
    decoder_args = {"hw_decoder_load": hw_decoder_load} if decode_device == "mixed" else {}
    color = types.RGB if pre.channels == 3 else types.GRAY
    # EXIF orientation applied as ImageOps.exif_transpose does, from the EXIF block (JPEG, PNG eXIf, WebP,
    # TIFF tags); orientation kept elsewhere (XMP, PNG text) sends the file to Pillow (formats.pillow_reason)
    images = fn.decoders.image(
        encoded, device=decode_device, output_type=color, adjust_orientation=True, **decoder_args
    )
    height, width = _torchvision_size(images, pre.resize)
    images = fn.resize(
        images, resize_y=height, resize_x=width, interp_type=pre.interpolation.dali, antialias=pre.antialias
    )
    crop_args = {"crop_pos_x": _torchvision_crop_pos(width, pre.crop), "crop_pos_y": _torchvision_crop_pos(height, pre.crop)}
    if augment is not None:
        crop_args = {"crop_pos_x": fn.random.uniform(range=(0.0, 1.0)), "crop_pos_y": fn.random.uniform(range=(0.0, 1.0))}
        if augment.flip_probability > 0:
            crop_args["mirror"] = fn.random.coin_flip(probability=augment.flip_probability)
    return fn.crop_mirror_normalize(
        images,
        crop=(pre.crop, pre.crop),
        mean=[m * 255.0 for m in pre.mean],
        std=[s * 255.0 for s in pre.std],
        dtype=types.FLOAT16 if decode_device == "mixed" else types.FLOAT,
        output_layout="CHW",
        **crop_args,
    )


MAX_DEFAULT_THREADS = 16
# Batches in DALI at once in decode_stream: the next batch's CPU stage runs while the GPU finishes this one.
STREAM_DEPTH = 2


def default_threads() -> int:
    """DALI's CPU threads when not given: the cores this process may run on, at most 16. With the hardware
    JPEG decoder off or partly used (an A2000 has none), the CPU Huffman decoding scales with them."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, MAX_DEFAULT_THREADS))


@dataclass
class _Batch:
    """A batch on its way through the decoder: its bytes, which files Pillow decodes and why, which DALI does."""

    blobs: list[bytes | memoryview]
    to_pillow: dict[int, str]
    to_dali: list[int]
    in_stream: bool = False  # fed to the stream's pipeline; its output not taken yet
    filler: bool = False  # fed only so that DALI's first run can start; its output is dropped


@dataclass
class DecodedBatch:
    """Decoded images of the inputs at `ok` (in order), and the inputs that failed with why."""

    images: torch.Tensor
    ok: list[int]
    failures: dict[int, Failure]


class ImageDecoder:
    """Decodes batches of encoded images with DALI on `device` (mixed GPU decoding, or CPU operators).

    Output is a [n, C, crop, crop] tensor on the device: fp16 on CUDA, fp32 on the CPU.
    """

    def __init__(
        self,
        pre: Preprocessing,
        device: Device,
        max_batch_size: int,
        num_threads: int | None = None,
        augment: Augmentation | None = None,
        hw_decoder_load: float = 0.65,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size {max_batch_size!r} must be at least 1")
        self.pre, self.device, self.max_batch_size = pre, device, max_batch_size
        self.num_threads = num_threads or default_threads()
        self.augment, self.hw_decoder_load = augment, hw_decoder_load
        self._pipe = None  # run a batch at a time (decode, and the bisection of a failed batch)
        self._stream = None  # run `depth` batches at a time by decode_stream
        self._stream_fed = 0  # batches fed to `_stream` since it was built
        self._streaming = True  # False after the stream ran out of GPU memory
        self._builds = 0
        self._dtype = torch.float16 if device.is_cuda else torch.float32

    def _build(self, depth: int = 1):
        from nvidia.dali import pipeline_def

        seed = (self.augment.seed + self._builds) if self.augment else 0
        self._builds += 1
        pipe = pipeline_def(_image_pipeline)(
            self.pre,
            "mixed" if self.device.is_cuda else "cpu",
            self.augment,
            self.hw_decoder_load,
            batch_size=self.max_batch_size,
            num_threads=self.num_threads,
            device_id=self.device.dali_device_id,
            prefetch_queue_depth=depth,
            seed=seed,
        )
        pipe.build()
        return pipe

    def prepare_stream(self, depth: int = STREAM_DEPTH) -> None:
        """Build the pipeline `decode_stream` (of this `depth`) would build at its first batch, now: a shard
        worker does it while it starts, off the first batch's path."""
        if self._stream is None:
            self._stream, self._stream_fed = self._build(depth), 0

    def _run(self, blobs: list[bytes | memoryview]) -> torch.Tensor:
        if self._pipe is None:
            self._pipe = self._build()
        self._pipe.feed_input("encoded", [np.frombuffer(b, dtype=np.uint8) for b in blobs])
        (out,) = self._pipe.run()
        return self._to_torch(out)

    def _to_torch(self, out) -> torch.Tensor:
        """A DALI output batch as a torch tensor on the device (copied on the current stream on CUDA)."""
        if self.device.is_cuda:
            from nvidia.dali.plugin.pytorch import feed_ndarray

            dense = out.as_tensor()
            target = torch.empty(dense.shape(), dtype=torch.float16, device=self.device.torch_device)
            feed_ndarray(dense, target, cuda_stream=torch.cuda.current_stream(self.device.torch_device))
            return target
        return torch.from_numpy(np.array(out.as_tensor()))

    def decode(self, blobs: Sequence[Blob | bytes]) -> DecodedBatch:
        """Decode up to `max_batch_size` images that passed `check_header` (`load_blobs`' `Blob`s, or bytes);
        a failing file is isolated by bisection, never fatal. Files with a `pillow_reason` are decoded by
        Pillow without trying DALI."""
        return self._finish(self._prepare(blobs))

    def decode_stream(self, batches: Iterable[Sequence[Blob | bytes]], depth: int = STREAM_DEPTH) -> Iterator[DecodedBatch]:
        """`decode` of each batch, in order, with up to `depth` batches in DALI at once: its CPU stage of one
        batch (the copy in, and Huffman decoding on its threads wherever the hardware decoder is off or partly
        used) overlaps the GPU stage of the batch before. When DALI fails on a batch, that batch and the ones
        in DALI behind it go through `decode`'s bisection, and the stream's pipeline is built again for the
        next batch. Close the generator (or run it to the end) before the decoder is used again.

        When it asks `batches` for batch n, at most `depth - 1` batches taken before are still held (in DALI,
        or waiting behind one that is), none before n - `depth` (a filler, `_fill`, holds a copy of the bytes of
        the batch it repeats): a caller reading batches into a ring of buffers may reuse the buffer of batch
        n - `depth` - 1 from then on."""
        pending: deque[_Batch] = deque()
        try:
            for blobs in batches:
                pending.append(batch := self._prepare(blobs))
                if batch.to_dali and depth > 1 and self._streaming:
                    self._feed(batch, depth, pending)
                # a batch that skips DALI (its files all failed to read, or go to Pillow) counts too: otherwise
                # batches of failures queue behind one in DALI, whose bytes are then still needed several batches
                # later (tests.tasks.images.test_decode: a read ring reused them under DALI's feet)
                while pending and (not pending[0].in_stream or len(pending) >= depth):
                    if pending[0].in_stream and self._stream_fed < depth:  # the stream's first run waits: start it
                        self._fill(depth, pending)
                    if (done := self._finish_oldest(pending)) is not None:
                        yield done
            self._fill(depth, pending)
            while pending:
                if (done := self._finish_oldest(pending)) is not None:
                    yield done
        finally:
            if any(b.in_stream for b in pending):  # abandoned: its outputs must not reach the next stream
                self._drop_stream(pending)

    def _prepare(self, blobs: Sequence[Blob | bytes]) -> _Batch:
        if len(blobs) > self.max_batch_size:
            raise ValueError(f"{len(blobs)} images given; this decoder takes at most {self.max_batch_size}")
        checked = [b if isinstance(b, Blob) else Blob(b, pillow_reason(b)) for b in blobs]
        to_pillow = {p: b.pillow_reason for p, b in enumerate(checked) if b.pillow_reason}
        return _Batch([b.data for b in checked], to_pillow, [p for p in range(len(checked)) if p not in to_pillow])

    def _finish(self, batch: _Batch, decoded: torch.Tensor | None = None) -> DecodedBatch:
        """The batch's images: DALI's output for `to_dali` when the stream gave it, else decoded here, by
        bisection where DALI fails; then the files that go to Pillow."""
        parts: list[tuple[list[int], torch.Tensor]] = []
        failures: dict[int, Failure] = {}
        if decoded is not None:
            parts.append((batch.to_dali, decoded))
        else:
            self._decode_range(batch.blobs, batch.to_dali, parts, failures)
        for p, why in batch.to_pillow.items():
            log.debug("image %d of the batch goes to Pillow: %s", p, why)
            self._decode_one_with_pillow(batch.blobs, p, why, parts, failures)
        return self._assemble(parts, failures)

    def _feed(self, batch: _Batch, depth: int, pending: deque[_Batch]) -> None:
        """Hand the batch to the stream's pipeline. DALI's first run of a pipeline runs `depth` iterations, so
        the first `depth - 1` batches wait for the next; after that each batch is run as it is fed."""
        try:
            if self._stream is None:
                self._stream, self._stream_fed = self._build(depth), 0
            self._stream.feed_input("encoded", [np.frombuffer(batch.blobs[p], dtype=np.uint8) for p in batch.to_dali])
            batch.in_stream = True
            self._stream_fed += 1
            if self._stream_fed >= depth:
                self._stream.schedule_run()
        except RuntimeError as e:
            self._stream_failed(e, pending)

    def _fill(self, depth: int, pending: deque[_Batch]) -> None:
        """Where the pipeline's first run waits for more batches than come (a short stream, or batches that skip
        DALI): feed a copy of the last batch's bytes as filler (its outputs are dropped) until that run can start.
        A copy, because a filler can stay in DALI after batches behind the one it repeats were taken, and the
        caller may reuse that one's buffer by then (with depth 3, DALI decoded a filler of batch 0 from the bytes
        of batch 4 and corrupted its heap: bench/NOTES.md, "Test data")."""
        last = next((b for b in reversed(pending) if b.in_stream), None)
        copied = [bytes(b) for b in last.blobs] if last is not None else []
        while last is not None and self._stream is not None and self._stream_fed < depth:
            pending.append(filler := _Batch(copied, {}, last.to_dali, filler=True))
            self._feed(filler, depth, pending)

    def _finish_oldest(self, pending: deque[_Batch]) -> DecodedBatch | None:
        """The oldest batch decoded (None for a filler): its stream output, or decoded here when it never
        entered the stream or the stream failed on it."""
        batch = pending.popleft()
        decoded = None
        if batch.in_stream:
            try:
                (out,) = self._stream.outputs()
                decoded = self._to_torch(out)
            except RuntimeError as e:
                self._stream_failed(e, pending)
        if batch.filler:
            return None
        return self._finish(batch, decoded)

    def _stream_failed(self, error: RuntimeError, pending: deque[_Batch]) -> None:
        if is_out_of_memory(error):  # a shallower queue needs less memory: the rest is decoded a batch at a time
            self._streaming = False
            torch.cuda.empty_cache()
            log.warning("DALI ran out of GPU memory with batches queued ahead; decoding one batch at a time")
        else:
            log.info("DALI failed on a batch in the stream; decoding it and the batches behind it again (%s)",
                     _dali_reason(error))
        self._drop_stream(pending)

    def _drop_stream(self, pending: deque[_Batch]) -> None:
        """Forget the stream's pipeline: batches in it are decoded again, one at a time; fillers are dropped."""
        self._stream = None
        kept = [b for b in pending if not b.filler]
        pending.clear()
        for b in kept:
            b.in_stream = False
            pending.append(b)

    def _assemble(self, parts: list[tuple[list[int], torch.Tensor]], failures: dict[int, Failure]) -> DecodedBatch:
        """One tensor with the decoded images in input order."""
        if not parts:
            images = torch.empty((0, *self.pre.input_shape), dtype=self._dtype, device=self.device.torch_device)
            return DecodedBatch(images=images, ok=[], failures=failures)
        ok = [p for positions, _ in parts for p in positions]
        images = torch.cat([t for _, t in parts]) if len(parts) > 1 else parts[0][1]
        if ok != sorted(ok):
            order = sorted(range(len(ok)), key=ok.__getitem__)
            images = images[torch.tensor(order, device=images.device)]
            ok = [ok[i] for i in order]
        return DecodedBatch(images=images, ok=ok, failures=failures)

    def _decode_one_with_pillow(self, blobs, position: int, why: str, parts, failures) -> None:
        decoded = _decode_with_pillow(blobs[position], self.pre, why)
        if isinstance(decoded, Failure):
            failures[position] = decoded
        else:
            parts.append(([position], decoded.unsqueeze(0).to(self.device.torch_device, self._dtype)))

    def _decode_range(self, blobs, positions: list[int], parts, failures) -> None:
        if not positions:
            return
        try:
            parts.append((positions, self._run([blobs[p] for p in positions])))
            return
        except RuntimeError as e:
            # DALI's GPU decoder can leave the pipeline unusable after an error: start a fresh one
            self._pipe = None
            if is_out_of_memory(e):  # not the files' fault: smaller pieces need less memory, nothing is failed
                torch.cuda.empty_cache()
                log.warning("DALI ran out of GPU memory decoding %d images at once; decoding them in halves",
                            len(positions))
            if len(positions) == 1:
                self._decode_one_with_pillow(blobs, positions[0], _dali_reason(e), parts, failures)
                if positions[0] not in failures:
                    log.warning("DALI could not decode image %d of the batch; decoded it with Pillow", positions[0])
                return
        half = len(positions) // 2
        self._decode_range(blobs, positions[:half], parts, failures)
        self._decode_range(blobs, positions[half:], parts, failures)


def decode_files(
    uris: Sequence[str], decoder: ImageDecoder, readers: ThreadPoolExecutor, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Iterator[tuple[list[int], torch.Tensor | None, dict[int, Failure]]]:
    """Read, header-check and decode `uris` a batch at a time (`decoder.max_batch_size`), for training and for
    compression's samples: per batch, the positions in `uris` of the decoded images (in order), the images (None
    when none decoded) and each failed position with why, read or decode. The classify path streams its batches
    instead (reads, decoding and the model overlapping: tasks.classify.shard)."""
    size = decoder.max_batch_size
    for start in range(0, len(uris), size):
        blobs = load_blobs(list(uris[start : start + size]), readers, max_pixels)
        failures = {start + i: b for i, b in enumerate(blobs) if isinstance(b, Failure)}
        good = [start + i for i, b in enumerate(blobs) if not isinstance(b, Failure)]
        decoded = decoder.decode([blobs[i - start] for i in good]) if good else None
        if decoded is not None:
            failures |= {good[p]: f for p, f in decoded.failures.items()}
        if decoded is None or not decoded.ok:
            yield [], None, failures
            continue
        yield [good[p] for p in decoded.ok], decoded.images, failures
