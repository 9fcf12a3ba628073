"""The decoder's settings for this card, measured rather than fixed in code: `a2k tune DIR` times a2k's own DALI
graph on a sample of DIR's images over hardware-decoder loads, DALI thread counts and batch sizes, and keeps the
fastest in a profile per card (under $A2K_HOME/profiles, with the machine's name and the date); classify runs on
that card take their defaults from it and say so in the log."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tasks.devices import Device
from tasks.home import a2k_home
from tasks.images.decode import ImageDecoder, default_threads
from tasks.images.preprocess import Preprocessing
from tasks.images.read import Blob, load_blobs

DEFAULT_LOAD = 0.65  # DALI's own default share of JPEGs for the hardware decoder, where there is no profile
LOADS = (0.0, 0.35, 0.65, 0.9, 1.0)
BATCHES = (128, 256)
SAMPLE_IMAGES = 2048
PASS_SECONDS = 0.6  # each timed pass lasts about this long (the sample repeated): short passes on a fast card are noise
PASS_IMAGES = 16384
NEAR = 0.02  # settings within 2% of the fastest are the same speed: the cheaper one (fewer threads, smaller load) wins


@dataclass(frozen=True)
class DecodeSettings:
    hw_decoder_load: float
    num_threads: int
    batch_size: int

    def describe(self) -> str:
        return f"hw_decoder_load {self.hw_decoder_load:g}, {self.num_threads} DALI threads, batch {self.batch_size}"


@dataclass(frozen=True)
class DecodeProfile:
    """What `a2k tune` measured on one card: every setting tried (images/s), the one chosen and why."""

    card: str
    machine: str
    measured_at: str
    host_cores: int
    sample: dict
    trials: list[dict]
    chosen: DecodeSettings
    why: str
    path: str = field(default="", compare=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("path")
        return d

    @classmethod
    def from_dict(cls, d: dict, path: str = "") -> "DecodeProfile":
        return cls(**{**d, "chosen": DecodeSettings(**d["chosen"])}, path=path)

    def describe(self) -> str:
        return (f"{self.chosen.describe()} from the decode profile of {self.card} measured {self.measured_at[:10]} "
                f"on {self.machine} ({self.why}; `a2k tune DIR` measures it again)")


def card_name(device: Device) -> str:
    if not device.is_cuda:
        try:
            with open("/proc/cpuinfo") as f:
                model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
        except OSError:
            model = ""
        return f"CPU {model or platform.processor() or platform.machine()}"
    import torch

    return torch.cuda.get_device_name(device.torch_device)


def profile_path(device: Device) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", card_name(device).lower()).strip("-") or "card"
    return a2k_home() / "profiles" / f"{slug}.json"


def load_profile(device: Device) -> DecodeProfile | None:
    """This card's profile, or None when it was never measured (or its file is not one a2k wrote)."""
    path = profile_path(device)
    try:
        return DecodeProfile.from_dict(json.loads(path.read_text()), str(path))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"decode profile {path} cannot be read ({e}); run `a2k tune DIR` again or remove it") from e


def _time_decode(blobs: list[Blob], pre: Preprocessing, device: Device, settings: DecodeSettings,
                 repeats: int) -> float:
    """Images/s of a2k's decoder (its stream, as a shard runs it) over `blobs` already in memory; the median of
    `repeats` passes after one warm-up pass of a few batches."""
    import torch

    decoder = ImageDecoder(pre, device, settings.batch_size, settings.num_threads,
                           hw_decoder_load=settings.hw_decoder_load)
    decoder.prepare_stream()

    def batches_of(n: int) -> list:
        many = [blobs[i % len(blobs)] for i in range(n)]
        return [many[i:i + settings.batch_size] for i in range(0, n, settings.batch_size)]

    def one_pass(batches: list) -> float:
        t0, n = time.perf_counter(), 0
        for out in decoder.decode_stream(batches):
            n += len(out.ok)
        if device.is_cuda:
            torch.cuda.synchronize(device.torch_device)
        return n / (time.perf_counter() - t0)

    one_pass(batches_of(3 * settings.batch_size))  # the pipeline's first runs (allocations, the decoders' start)
    warm = one_pass(batches_of(3 * settings.batch_size))
    batches = batches_of(min(max(len(blobs), int(warm * PASS_SECONDS)), PASS_IMAGES))
    rate = statistics.median(one_pass(batches) for _ in range(repeats))
    del decoder
    return rate


def _read_sample(uris: list[str], images: int) -> list[Blob]:
    """Up to `images` of the images (repeated when there are fewer), read and header-checked as a run does."""
    with ThreadPoolExecutor(8) as pool:
        got = [b for b in load_blobs(uris[:images], pool) if isinstance(b, Blob)]
    if not got:
        raise ValueError(f"none of the {min(len(uris), images)} images sampled could be read as an image")
    return [got[i % len(got)] for i in range(max(images, len(got)))]


def _pick(trials: list[dict], key: str) -> dict:
    """The fastest trial, or the cheapest within NEAR of it (the smaller value of `key`)."""
    best = max(t["images_per_second"] for t in trials)
    near = [t for t in trials if t["images_per_second"] >= best * (1 - NEAR)]
    return min(near, key=lambda t: t[key])


def tune_decoder(uris: list[str], device: Device, pre: Preprocessing | None = None, images: int = SAMPLE_IMAGES,
                 repeats: int = 3, say: Callable[[str], None] = print, sample: dict | None = None) -> DecodeProfile:
    """Measure the decoder on `images` of `uris` and write this card's profile: first the hardware decoder's load
    (CUDA) at all threads and batch 256, then the threads, then the batch, each at the best of the step before."""
    pre = pre or Preprocessing()
    blobs = _read_sample(uris, images)
    threads_max = default_threads()
    trials: list[dict] = []

    def trial(s: DecodeSettings) -> dict:
        rate = _time_decode(blobs, pre, device, s, repeats)
        t = {**asdict(s), "images_per_second": round(rate, 1)}
        trials.append(t)
        say(f"  {s.describe()}: {rate:,.0f} images/s")
        return t

    loads = LOADS if device.is_cuda else (0.0,)
    by_load = [trial(DecodeSettings(load, threads_max, max(BATCHES))) for load in loads]
    load = _pick(by_load, "hw_decoder_load")["hw_decoder_load"]
    thread_counts = sorted({max(1, threads_max // 2), max(1, threads_max * 3 // 4)} - {threads_max})
    by_threads = [t for t in by_load if t["hw_decoder_load"] == load]
    by_threads += [trial(DecodeSettings(load, n, max(BATCHES))) for n in thread_counts]
    threads = _pick(by_threads, "num_threads")["num_threads"]
    by_batch = [t for t in by_threads if t["num_threads"] == threads]
    by_batch += [trial(DecodeSettings(load, threads, b)) for b in BATCHES if b != max(BATCHES)]
    chosen_trial = _pick(by_batch, "batch_size")
    chosen = DecodeSettings(load, threads, chosen_trial["batch_size"])
    rates = ", ".join(f"{t['hw_decoder_load']:g}: {t['images_per_second']:,.0f}" for t in by_load)
    why = (f"{chosen_trial['images_per_second']:,.0f} images/s decoding alone"
           + (f"; by hardware-decoder load {rates}" if device.is_cuda else ""))
    profile = DecodeProfile(
        card=card_name(device), machine=platform.node(), measured_at=datetime.now(timezone.utc).isoformat(
            timespec="seconds"), host_cores=threads_max, sample={**(sample or {}), "images": len(blobs),
                                                                "median_bytes": int(statistics.median(
                                                                    len(b.data) for b in blobs))},
        trials=trials, chosen=chosen, why=why)
    path = profile_path(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(profile.to_dict(), indent=2) + "\n")
    os.replace(tmp, path)
    return DecodeProfile.from_dict(profile.to_dict(), str(path))


def decoder_defaults(device: Device, num_threads: int | None, hw_decoder_load: float | None,
                     batch_size: int | None) -> tuple[DecodeSettings | None, str]:
    """The decoder settings of a run whose parameters left some unset: each unset one from this card's profile
    (threads capped at the cores this process may use), else a2k's fixed default. Returns (the profile's settings
    as applied, or None) and a sentence for the log saying what was chosen and why."""
    given = [n for n, v in (("hw_decoder_load", hw_decoder_load), ("num_threads", num_threads),
                            ("batch_size", batch_size)) if v is not None]
    if len(given) == 3:
        return None, "decoder settings as given"
    profile = load_profile(device)
    if profile is None:
        load = f"hw_decoder_load {DEFAULT_LOAD:g}, " if device.is_cuda else ""
        return None, (f"no decode profile for {card_name(device)}: {load}{default_threads()} DALI threads "
                      "(`a2k tune DIR` measures this card's best)")
    c = profile.chosen
    applied = DecodeSettings(
        c.hw_decoder_load if hw_decoder_load is None else hw_decoder_load,
        min(c.num_threads, default_threads()) if num_threads is None else num_threads,
        c.batch_size if batch_size is None else batch_size)
    return applied, profile.describe() + (f"; given: {', '.join(given)}" if given else "")
