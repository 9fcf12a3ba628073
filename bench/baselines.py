"""The two pipelines a2k is compared with on the same files and model: the PIL + torch DataLoader pipeline most
users write, and the naive loop (DALI -> model -> Parquet, one step after the other, nothing overlapped)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

BENCH_SCHEMA = pa.schema([
    ("uri", pa.string()), ("label", pa.string()), ("score", pa.float32()),
    ("topk_labels", pa.list_(pa.string())), ("topk_scores", pa.list_(pa.float32())),
])
TOP_K = 5


def prediction_table(uris: list[str], scores: np.ndarray, indices: np.ndarray, class_names: np.ndarray) -> pa.Table:
    """uri, best label and score, and the top-k labels and scores: roughly a2k's prediction columns."""
    names = class_names[indices]
    return pa.table({
        "uri": pa.array(uris, pa.string()),
        "label": pa.array(names[:, 0].tolist(), pa.string()),
        "score": pa.array(scores[:, 0].astype(np.float32)),
        "topk_labels": pa.array(names.tolist(), pa.list_(pa.string())),
        "topk_scores": pa.array(scores.astype(np.float32).tolist(), pa.list_(pa.float32())),
    }, schema=BENCH_SCHEMA)


def list_uris(images_dir: str) -> list[str]:
    """The same files, in the same order, that classify-images lists."""
    from tasks.images.manifest import list_images

    return list_images(images_dir).column("uri").to_pylist()


def load_classifier(model_dir: str, device: str, gpu_memory_gb: float | None):
    """a2k's own model loader (fp16 channels_last on CUDA, fp32 on the CPU), under the same memory cap as a2k.
    Returns (classifier, ballast): keep the ballast alive while measuring."""
    from tasks.devices import resolve_device
    from tasks.classify.infer import Classifier, limit_gpu_memory

    dev = resolve_device(device)
    ballast = limit_gpu_memory(dev, gpu_memory_gb) if gpu_memory_gb and dev.is_cuda else None
    return Classifier(model_dir, dev), ballast


def warm_up(classifier, batch_size: int, input_shape: tuple[int, int, int]) -> None:
    """One forward pass on random input, so cuDNN's algorithm search is not timed (a2k's warm run has done it)."""
    x = torch.randn(batch_size, *input_shape, device=classifier.device.torch_device)
    classifier.top_k(x, TOP_K)


def _sync(device) -> None:
    if device.is_cuda:
        torch.cuda.synchronize(device.torch_device)


class _PILDataset(torch.utils.data.Dataset):
    """What the torchvision examples do: PIL open, convert RGB, Resize, CenterCrop, ToTensor, Normalize."""

    def __init__(self, uris: list[str], pre) -> None:
        from torchvision import transforms

        self.uris = uris
        self.transform = transforms.Compose([
            transforms.Resize(pre.resize, interpolation=pre.interpolation.torchvision),
            transforms.CenterCrop(pre.crop),
            transforms.ToTensor(),
            transforms.Normalize(pre.mean, pre.std),
        ])
        self.mode = "RGB" if pre.channels == 3 else "L"

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.uris[i]) as im:
            return self.transform(im.convert(self.mode)), i


def run_pil_dataloader(images_dir: str, model_dir: str, output: str, batch_size: int, device: str,
                       gpu_memory_gb: float | None, num_workers: int | None = None) -> dict:
    """PIL + DataLoader(num_workers=cores, pin_memory) -> model -> Parquet; seconds from the first batch asked
    for to the Parquet file closed (worker start-up included, model load and warm-up not)."""
    uris = list_uris(images_dir)
    classifier, _ballast = load_classifier(model_dir, device, gpu_memory_gb)
    pre = classifier.entry.preprocessing
    warm_up(classifier, batch_size, pre.input_shape)
    workers = num_workers if num_workers is not None else (os.cpu_count() or 1)
    loader = torch.utils.data.DataLoader(_PILDataset(uris, pre), batch_size=batch_size, shuffle=False,
                                         num_workers=workers, pin_memory=classifier.device.is_cuda)
    Path(output).mkdir(parents=True, exist_ok=True)
    rows = 0
    _sync(classifier.device)
    t0 = time.perf_counter()
    with pq.ParquetWriter(f"{output}/predictions.parquet", BENCH_SCHEMA) as writer:
        for images, index in loader:
            scores, indices = classifier.top_k(images, TOP_K)
            writer.write_table(prediction_table([uris[i] for i in index.tolist()], scores, indices,
                                                classifier.class_names))
            rows += len(index)
    seconds = time.perf_counter() - t0
    return {"images": len(uris), "rows": rows, "seconds": seconds,
            "notes": f"{workers} workers, pin_memory={classifier.device.is_cuda}, {classifier.device}"}


def run_naive_loop(images_dir: str, model_dir: str, output: str, batch_size: int, device: str,
                   hw_decoder_load: float, num_threads: int | None, gpu_memory_gb: float | None) -> dict:
    """Read a batch of files, decode it with a2k's DALI decoder, run the model, write it; then the next batch.
    No prefetch, no overlap, no Prefect. DALI and the model are warmed on the first batch before timing."""
    from tasks.images.decode import ImageDecoder

    uris = list_uris(images_dir)
    classifier, _ballast = load_classifier(model_dir, device, gpu_memory_gb)
    decoder = ImageDecoder(classifier.entry.preprocessing, classifier.device, batch_size, num_threads,
                           hw_decoder_load=hw_decoder_load)

    def read(batch: list[str]) -> list[bytes]:
        out = []
        for uri in batch:
            with open(uri, "rb") as f:
                out.append(f.read())
        return out

    classifier.top_k(decoder.decode(read(uris[:batch_size])).images, TOP_K)  # warm-up: DALI build, cuDNN
    Path(output).mkdir(parents=True, exist_ok=True)
    rows = 0
    _sync(classifier.device)
    t0 = time.perf_counter()
    with pq.ParquetWriter(f"{output}/predictions.parquet", BENCH_SCHEMA) as writer:
        for start in range(0, len(uris), batch_size):
            batch = uris[start:start + batch_size]
            decoded = decoder.decode(read(batch))
            scores, indices = classifier.top_k(decoded.images, TOP_K)
            writer.write_table(prediction_table([batch[p] for p in decoded.ok], scores, indices,
                                                classifier.class_names))
            rows += len(decoded.ok)
    seconds = time.perf_counter() - t0
    return {"images": len(uris), "rows": rows, "seconds": seconds,
            "notes": f"{decoder.num_threads} DALI threads, hw_decoder_load {hw_decoder_load}, {classifier.device}"}
