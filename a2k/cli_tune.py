"""`a2k tune DIR`: measure the decoder's best settings for this card on DIR's images and keep them as its profile
(tasks.images.tune); classify runs take their unset decoder settings from it."""

from __future__ import annotations

import argparse
import json
import os

MIN_IMAGES = 512  # two batches of the largest size tried, after the warm-up


def add_parsers(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("tune", help="measure this card's best hw_decoder_load, DALI threads and batch size on a "
                                    "folder's images; classify runs use them from then on")
    t.add_argument("input", help="folder of images like the ones you classify (their size decides the best settings)")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    t.add_argument("--images", type=int, default=2048, help="images to time each setting on")
    t.add_argument("--json", action="store_true", help="print the profile as JSON")


def run(args: argparse.Namespace) -> None:
    if args.images < MIN_IMAGES:
        raise ValueError(f"--images {args.images} is too few to time batches of up to 256; use {MIN_IMAGES} or more")
    if not os.path.isdir(args.input):
        raise FileNotFoundError(f"input {args.input!r} is not a folder")
    from tasks.devices import resolve_device
    from tasks.images.manifest import list_images
    from tasks.images.tune import tune_decoder

    dev = resolve_device(args.device)
    uris = list_images(args.input).column("uri").to_pylist()
    if not uris:
        raise ValueError(f"input {args.input!r} has no images to time the decoder on")
    print(f"timing a2k's decoder on {min(len(uris), args.images)} of {len(uris)} images from {args.input} on {dev}")
    profile = tune_decoder(uris, dev, images=args.images, say=print, sample={"folder": os.path.abspath(args.input)})
    if args.json:
        print(json.dumps(profile.to_dict(), indent=2))
    print(f"chosen: {profile.chosen.describe()} ({profile.why})")
    print(f"profile: {profile.path}")
