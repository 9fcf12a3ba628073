"""Benchmark: parent vs compressed children (size, images/s, peak GPU memory, accuracy on the parent's test split).

Trains the parent on a labelled folder (`<root>/<class>/<file>`; default: the demo digits), then runs the
compress-model flow once per recipe chain and prints one Markdown table per chain for bench/RESULTS.md.
For sparse-2:4 it also times the 2:4 Linear layers through `to_sparse_semi_structured` against dense, since the
classify path stores and runs them dense. Run on the GPU machine, e.g.:
    python3 bench/compress.py --arch seed-cnn --epochs 10
    python3 bench/compress.py --arch resnet50 --source DIR --epochs 3 --image-size 224
CPU smoke run: python3 bench/compress.py --device cpu --epochs 1 --chains fp16 int8-weights
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

DEFAULT_CHAINS = ["fp16", "prune:0.3,epochs=2", "int8-weights", "sparse-2:4"]


def sparse_speedup(model_dir: str, batch_size: int, iters: int = 50) -> dict:
    """Model-only images/s of the 2:4 child with its eligible Linear weights as semi-structured tensors vs dense."""
    import torch
    from torch.sparse import to_sparse_semi_structured

    from tasks.compress.prune import sparse_layers
    from tasks.models.entry import load_model

    entry, model = load_model(model_dir)
    model = model.cuda().half().eval()
    x = torch.randn((batch_size, *entry.preprocessing.input_shape), device="cuda", dtype=torch.half)

    def timed() -> float:
        with torch.inference_mode():
            for _ in range(5):
                model(x)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(iters):
                model(x)
            torch.cuda.synchronize()
        return iters * batch_size / (time.perf_counter() - t0)

    dense = timed()
    layers = sparse_layers(model)
    for _, layer in layers:
        layer.weight = torch.nn.Parameter(to_sparse_semi_structured(layer.weight.detach()), requires_grad=False)
    return {"dense_images_per_second": dense, "sparse_images_per_second": timed(),
            "sparse_layers": [n for n, _ in layers]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default=None, help="labelled folder; default: the demo digits (written to a temp dir)")
    p.add_argument("--arch", default="seed-cnn")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--chains", nargs="+", default=DEFAULT_CHAINS, help="each a '+'-joined chain, e.g. prune:0.3+fp16")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--target", default=None)
    p.add_argument("--json", default=None, help="also write every result to this JSON file")
    args = p.parse_args()

    from tasks.devices import resolve_device
    from flows.compress_model import compress_model
    from flows.train_model import train_model
    from tasks.compress.measure import format_table
    from tasks.models.registry import get_model

    work = Path(tempfile.mkdtemp(prefix="a2k-bench-compress-"))
    os.environ.setdefault("A2K_HOME", str(work / "home"))
    source = args.source
    if source is None:
        from tasks.train.demo_data import write_digits_dataset

        source = str(write_digits_dataset(work / "digits"))
    device = resolve_device(args.device)
    registry = str(work / "registry")
    t0 = time.perf_counter()
    trained = train_model(dataset=source, name="bench", arch=args.arch, epochs=args.epochs, image_size=args.image_size,
                          flip_probability=0.0 if args.source is None else 0.5, device=str(device), registry=registry)
    print(f"trained {args.arch} in {time.perf_counter() - t0:.0f}s on {device}: {trained['metrics']}")
    results = []
    for chain in args.chains:
        recipes = chain.split("+")
        try:
            r = compress_model(model=trained["ref"], recipes=recipes, target=args.target, device=str(device),
                               batch_size=args.batch_size, registry=registry)
        except (ValueError, RuntimeError) as err:  # e.g. sparse-2:4 on the CPU: reported, not hidden
            print(f"\n### {args.arch}: {chain}\n\nrefused: {err}")
            results.append({"chain": chain, "refused": str(err)})
            continue
        print(f"\n### {args.arch}: {chain} on {device} (batch {args.batch_size})\n")
        print(format_table(r["comparison"]))
        print(f"\n{'passed' if r['passed'] else 'REJECTED'}: {r['reason']}")
        if "sparse-2:4" in recipes and device.is_cuda:
            url = get_model(r["child"], registry).url
            r["sparse_speedup"] = sparse_speedup(url, args.batch_size)
            print(f"2:4 layers as semi-structured tensors: {json.dumps(r['sparse_speedup'])}")
        results.append({"chain": chain, **{k: r[k] for k in ("child", "status", "reason", "comparison", "steps")},
                        "sparse_speedup": r.get("sparse_speedup")})
    if args.json:
        Path(args.json).write_text(json.dumps({"arch": args.arch, "device": str(device), "results": results},
                                              indent=2, default=str))


if __name__ == "__main__":
    main()
