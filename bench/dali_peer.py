"""The strongest peer of a fresh `a2k classify`: the script a user writes from DALI's documented PyTorch path
(readers.file -> decoders.image -> resize -> crop_mirror_normalize -> DALIGenericIterator), the model a2k runs,
top-5 into Parquet. Run as its own process; prints one JSON line.

    python -m bench.dali_peer --data DIR --model MODEL_DIR --output OUT.parquet [--batch-size 256] \
        [--num-threads N] [--device auto|cuda|cpu] [--hw-decoder-load 0.65]
"""

from a2k.clock import CLOCK, process_age  # first: its clock reads the process's age when it loads

import argparse
import json
from pathlib import Path


def build_loader(data: Path, files: list[str], pre, dev, batch_size: int, threads: int, hw_decoder_load: float):
    """DALI's documented PyTorch path; each sample's label is its index in `files` (readers.file's rule when
    `files` comes without `labels`), so every row can name its file."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=dev.dali_device_id)
    def pipe():
        encoded, labels = fn.readers.file(file_root=str(data), files=files, random_shuffle=False, name="Reader")
        decoder = {"device": "mixed", "hw_decoder_load": hw_decoder_load} if dev.is_cuda else {"device": "cpu"}
        images = fn.decoders.image(encoded, output_type=types.RGB if pre.channels == 3 else types.GRAY, **decoder)
        images = fn.resize(images, resize_shorter=pre.resize, interp_type=pre.interpolation.dali,
                           antialias=pre.antialias)
        images = fn.crop_mirror_normalize(images, crop=(pre.crop, pre.crop), mean=[m * 255 for m in pre.mean],
                                          std=[s * 255 for s in pre.std], output_layout="CHW",
                                          dtype=types.FLOAT16 if dev.is_cuda else types.FLOAT)
        return images, labels

    return DALIGenericIterator(pipe(), ["images", "labels"], reader_name="Reader",
                               last_batch_policy=LastBatchPolicy.PARTIAL)  # no image dropped, none padded


def classify(data: Path, model_dir: str, output: str, batch_size: int, num_threads: int | None, device: str,
             hw_decoder_load: float = 0.65) -> dict:
    """Model, then pipeline, then every batch to Parquet; seconds counted from the process start."""
    import pyarrow.parquet as pq

    from bench.baselines import BENCH_SCHEMA, TOP_K, prediction_table
    from tasks.classify.infer import Classifier
    from tasks.devices import resolve_device
    from tasks.images.decode import default_threads

    dev = resolve_device(device)
    classifier = Classifier(model_dir, dev)  # the model a2k runs: fp16 channels_last on CUDA, fp32 on the CPU
    files = sorted(str(p.relative_to(data)) for p in data.rglob("*")
                   if p.suffix.lower() in (".jpg", ".jpeg", ".png") and p.is_file())
    if not files:
        raise SystemExit(f"--data {data}: no images (*.jpg, *.jpeg, *.png) found")
    threads = num_threads or default_threads()
    loader = build_loader(data, files, classifier.entry.preprocessing, dev, batch_size, threads, hw_decoder_load)
    built = process_age()
    rows, seen = 0, set()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(output, BENCH_SCHEMA) as writer:
        for batch in loader:
            index = batch[0]["labels"].view(-1).tolist()
            scores, indices = classifier.top_k(batch[0]["images"], TOP_K)
            uris = [str(data / files[i]) for i in index]
            writer.write_table(prediction_table(uris, scores, indices, classifier.class_names))
            rows += len(index)
            seen.update(index)
    closed = process_age()
    if rows != len(files) or len(seen) != len(files):  # PARTIAL must give every file exactly once
        raise SystemExit(f"{len(files)} files but {rows} rows for {len(seen)} distinct files in {output}")
    return {"images": len(files), "rows": rows, "seconds": round(closed, 3), "pipeline_built_s": round(built, 3),
            "seconds_after_build": round(closed - built, 3), "clock": CLOCK, "batch_size": batch_size,
            "num_threads": threads, "device": str(dev), "hw_decoder_load": hw_decoder_load if dev.is_cuda else None}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="folder of images (walked recursively)")
    p.add_argument("--model", required=True, help="a model directory (model.json)")
    p.add_argument("--output", required=True, help="the Parquet file to write")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-threads", type=int, default=None, help="DALI threads (default: a2k's default)")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    p.add_argument("--hw-decoder-load", type=float, default=0.65, help="hardware JPEG decoder share (DALI default)")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size {args.batch_size} must be at least 1")
    print(json.dumps(classify(args.data.resolve(), args.model, args.output, args.batch_size, args.num_threads,
                              args.device, args.hw_decoder_load)), flush=True)


if __name__ == "__main__":
    main()
