"""Ray Data's documented batch-inference pipeline on the same files and model: `read_images` (PIL decode in Ray
tasks) -> `map` with the torchvision transforms -> `map_batches` with a class-based actor pool, one actor per GPU
holding the model -> `write_parquet`. Benchmark code only: a2k does not depend on Ray."""

from __future__ import annotations

import functools
import os
import time

import numpy as np

from bench.baselines import TOP_K


@functools.lru_cache(maxsize=4)
def _transform(pre):
    """The per-row transform of Ray's ResNet example: ToTensor then Resize, CenterCrop, Normalize."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.ToTensor(),
        transforms.Resize(pre.resize, interpolation=pre.interpolation.torchvision, antialias=True),
        transforms.CenterCrop(pre.crop),
        transforms.Normalize(pre.mean, pre.std),
    ])


def preprocess_image(row: dict, pre) -> dict:
    return {"path": row["path"], "transformed": _transform(pre)(row["image"]).numpy()}


class Predictor:
    """The GPU actor: loads the model once (a2k's loader, so the same fp16 channels_last model), then top-k."""

    def __init__(self, model_dir: str, device: str, gpu_memory_gb: float | None) -> None:
        from bench.baselines import load_classifier

        self.classifier, self._ballast = load_classifier(model_dir, device, gpu_memory_gb)

    def __call__(self, batch: dict) -> dict:
        import torch

        images = batch["transformed"]
        if images.dtype == object:  # rows of differing shapes come as an array of arrays
            images = np.stack(images)
        scores, indices = self.classifier.top_k(torch.from_numpy(images), TOP_K)
        names = self.classifier.class_names[indices]
        return {"uri": batch["path"], "label": names[:, 0], "score": scores[:, 0].astype(np.float32),
                "topk_labels": names, "topk_scores": scores.astype(np.float32)}


def run_ray_data(images_dir: str, model_dir: str, output_root: str, batch_size: int, device: str,
                 gpu_memory_gb: float | None, runs: int = 2) -> list[dict]:
    """Run the Ray pipeline `runs` times into fresh folders (the first includes actor start-up and worker
    imports; `ray.init` is outside the timing); seconds from building the dataset to write_parquet's return."""
    import pyarrow.parquet as pq
    import ray
    import torch

    from tasks.devices import resolve_device
    from bench.baselines import list_uris
    from tasks.models.entry import read_entry

    dev = resolve_device(device)
    gpus = torch.cuda.device_count() if dev.is_cuda else 0
    listed = len(list_uris(images_dir))
    pre = read_entry(model_dir).preprocessing
    ray.init(num_cpus=os.cpu_count(), num_gpus=gpus, include_dashboard=False, log_to_driver=False,
             ignore_reinit_error=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = []
    try:
        for run in range(1, runs + 1):
            output = f"{output_root}/run{run}"
            t0 = time.perf_counter()
            ds = ray.data.read_images(images_dir, mode="RGB" if pre.channels == 3 else "L", include_paths=True)
            # On a GPU the transform runs in CPU tasks beside the actor; without one (num_gpus=0 both) Ray fuses it
            # into the actor, so the CPU row measures one process decoding and running the model
            ds = ds.map(preprocess_image, fn_kwargs={"pre": pre})
            ds = ds.map_batches(
                Predictor, fn_constructor_args=(model_dir, "cuda" if dev.is_cuda else "cpu", gpu_memory_gb),
                batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=max(gpus, 1)),
                num_gpus=1 if gpus else 0,
            )
            ds.write_parquet(output)
            seconds = time.perf_counter() - t0
            written = pq.ParquetDataset(output).read(columns=["uri"]).num_rows
            rows.append({"variant": f"run {run}" + (" (actor start-up)" if run == 1 else ""), "images": listed,
                         "rows": written, "seconds": seconds,
                         "notes": f"ray {ray.__version__}, {max(gpus, 1)} actor(s), num_gpus={1 if gpus else 0}, "
                                  f"{os.cpu_count()} CPUs"})
    finally:
        ray.shutdown()
    return rows
