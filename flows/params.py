"""Parameter types shared by the flows (each constraint and description written once, checked by pydantic wherever
a flow's signature is: Prefect, the CLI), and the checks of a parameter that need the filesystem."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field, ValidationError

from tasks.classify.output import Output
from tasks.devices import check_device_spec
from tasks.runner import TaskRunnerKind
from tasks.storage import check_reachable, filesystem, full_url, is_url, redact

InputSource = Annotated[str, Field(
    description="a folder of images (walked recursively), an s3://bucket/prefix, or a .parquet manifest with a 'uri' "
                "column (local or on S3)")]
OutputTarget = Annotated[str, Field(description="a folder or s3://bucket/prefix for the Parquet dataset")]
ModelSpec = Annotated[str, Field(
    description="models:/NAME/VERSION, models:/NAME@ALIAS, models:/NAME/latest, NAME (= NAME@production) or a model "
                "folder")]
RegistryUrl = Annotated[str, Field(description="the model registry: a folder or s3://bucket/prefix "
                                               "(default: $A2K_REGISTRY, else $A2K_HOME/models)")]
def _check_arch_name(name: str) -> str:
    from tasks.models.zoo import resolve_architecture  # imports torchvision: only where an architecture is given

    resolve_architecture(name)  # an unknown name or weights: refused with the close matches
    return name


ArchName = Annotated[str, AfterValidator(_check_arch_name), Field(
    description="a built-in architecture (seed-cnn, tiny-cnn, resnet18, resnet50, mobilenet_v3_small, "
                "efficientnet_b0), any torchvision classification model by name (e.g. regnet_y_400mf), timm:NAME "
                "(with timm installed: pip install 'a2k[timm]'); to import, NAME:WEIGHTS (e.g. resnet50:IMAGENET1K_V2) "
                "takes the preprocessing and class names those torchvision weights record")]
BatchSize = Annotated[int, Field(ge=1, le=8192, description="images per GPU/CPU batch")]
AutoBatchSize = Annotated[int, Field(
    ge=1, le=8192, description="images per batch; unset: the largest that fits the free GPU memory, at most 256 "
                               "(64 on the CPU)")]
ShardSize = Annotated[int, Field(ge=1, le=1_000_000, description="images per shard (one task and one Parquet part each)")]
TopK = Annotated[int, Field(ge=1, le=1000, description="how many best classes to keep per image")]
DeviceSpec = Annotated[str, AfterValidator(check_device_spec), Field(description="auto, cpu, cuda or cuda:N")]
Threads = Annotated[int, Field(ge=1, le=256, description="DALI CPU threads (unset: from this card's decode profile, `a2k tune`, else the usable cores, at most 16)")]
Epochs = Annotated[int, Field(ge=1, le=10_000, description="passes over the training split")]
Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]
ValFraction = Annotated[float, Field(gt=0.0, lt=1.0, description="share of the images held out to score each epoch "
                                                                  "(val_accuracy)")]
TestFraction = Annotated[float, Field(gt=0.0, lt=1.0, description="share of the images held out for the test split "
                                                                   "(recorded with the version; evaluate and compress "
                                                                   "measure on it)")]
LearningRate = Annotated[float, Field(gt=0, le=10, description="peak learning rate of AdamW's one-cycle schedule")]
Seed = Annotated[int, Field(description="seed of the split, the initial weights and the augmentation")]
FlipProbability = Annotated[float, Field(ge=0, le=1, description="chance that a training image is mirrored "
                                                                 "left-right")]
ImageSize = Annotated[int, Field(ge=8, le=1024, description="side of the model's input in pixels (unset: the "
                                                            "architecture's default)")]
DatasetFolder = Annotated[str, Field(description="labelled images laid out as <root>/<class>/<file>")]
ModelName = Annotated[str, Field(description="the name to register the model under (its next version)")]
Workdir = Annotated[str, Field(description="folder for the digits dataset and the predictions (unset: $A2K_HOME/demo)")]
HwDecoderLoad = Annotated[float, Field(ge=0.0, le=1.0, description="share of JPEG decoding on the GPU's hardware decoder (unset: from this card's decode profile, `a2k tune`, else 0.65)")]
GpuMemoryGb = Annotated[float, Field(
    gt=0, le=4096, description="use at most this many GiB of GPU memory (e.g. 6, as an RTX A2000 6 GB; unset: "
                               "no cap); on out-of-memory batches halve")]
def _check_target(name: str) -> str:
    from tasks.targets import get_target

    return get_target(name).name


TargetName = Annotated[str, AfterValidator(_check_target), Field(
    description="run as on this card (e.g. a2000): its GPU memory, no hardware JPEG decoder where it has none, its "
                "host's cores for DALI, and the model on the SMs that match its tensor throughput (a green context)")]
CompressDemo = Annotated[bool, Field(
    description="compress the trained model and promote the fastest child that passes the gate (--no-compress: "
                "classify with the trained one)")]
TaskRunnerChoice = Annotated[
    TaskRunnerKind,
    Field(description="local: shards in the flow's process; dask: on a Dask cluster (a temporary one, or the scheduler "
                      "at --dask-address)"),
]
DaskAddress = Annotated[str, Field(min_length=1, description="address of a running Dask scheduler, e.g. tcp://host:8786 "
                                                             "(unset: a temporary local cluster)")]
DaskWorkers = Annotated[int, Field(ge=1, le=1024, description="workers of the temporary local Dask cluster "
                                                        "(unset: one per GPU; on the CPU one per 2 cores, at most 4)")]
Overwrite = Annotated[bool, Field(description="replace parts in the output left by another input, model or setting")]
FullRun = Annotated[bool, Field(description="classify every image again (otherwise only images new or changed since "
                                            "the last committed run)")]


def check_input_source(v: str) -> str:
    """An input that exists (a folder or manifest, or a store prefix holding objects), as a full path or URL."""
    if is_url(v):
        return _check_store_input(v)
    if not Path(v).expanduser().exists():
        raise ValueError(f"input {v!r} does not exist; give a folder of images or a .parquet manifest")
    return str(Path(v).expanduser().resolve())


def check_output_target(v: str) -> str:
    """An output that takes writes (created when it does not exist), as a full path or URL."""
    if is_url(v):
        return _check_store_output(v)
    path = Path(v).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise ValueError(f"output {v!r} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".a2k-write-probe-{uuid.uuid4().hex}"  # its own: two runs' checks at once do not meet
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise ValueError(f"output {v!r} is not writable: {e.strerror or e}") from None
    return str(path)


def _check_store_input(v: str) -> str:
    """An input in object storage: a .parquet manifest object, or a prefix holding at least one object."""
    fs, path = filesystem(v)
    check_reachable(fs)  # else a refused connection reads as a prefix that holds nothing
    fs.invalidate_cache(path)
    try:
        if v.lower().endswith(".parquet"):
            if not fs.isfile(path):
                raise ValueError(f"input manifest {v!r} does not exist")
        elif not fs.isdir(path):  # on S3 a prefix exists while an object is under it
            what = "is an object but not a .parquet manifest" if fs.isfile(path) else "does not exist or holds nothing"
            raise ValueError(f"input {v!r} {what}; give a prefix of images (s3://bucket/prefix) or a .parquet manifest")
    except OSError as e:  # e.g. access denied
        raise ValueError(f"input {v!r} cannot be read: {redact(str(e))}") from None
    return full_url(fs, path)


def _check_store_output(v: str) -> str:
    """An output in object storage: its bucket must exist (it is never created) and take a write under `_a2k/`."""
    out = Output(v)
    check_reachable(out.fs)  # else a refused connection reads as a bucket that does not exist
    bucket = out.root.split("/", 1)[0]
    try:
        if not out.fs.exists(bucket):
            raise ValueError(f"output {v!r}: bucket {bucket!r} does not exist (or these credentials cannot see it); "
                             "create it or give an existing bucket")
        probe = out.new_probe()
        out.fs.pipe_file(probe, b"")
        out.fs.rm(probe)
    except OSError as e:
        raise ValueError(f"output {v!r} is not writable: {redact(str(e))}") from None
    return out.url_of(out.root)


def check_dataset_folder(v: str) -> str:
    """A labelled folder that exists, as a full path."""
    path = Path(v).expanduser()
    if not path.is_dir():
        raise ValueError(f"dataset {v!r} is not a folder; lay it out as <root>/<class>/<file>")
    return str(path.resolve())


def check_architecture(v: str) -> str:
    """An architecture train can build: a built-in one, a torchvision classifier or timm:NAME; unknown names are
    refused with the close matches, and NAME:WEIGHTS too (train builds with random initialisation)."""
    from tasks.models.zoo import resolve_architecture  # imports torchvision: only where an architecture is given

    spec = resolve_architecture(v)
    if spec.weights:
        raise ValueError(f"{v!r} names pretrained weights ({spec.weights}), which train does not download or load: it "
                         f"builds {spec.name!r} with random initialisation; give {spec.name!r}, or import the weights "
                         f"with `a2k models import FILE --arch {v}`")
    return spec.name


def check_model_spec(model: str, registry: str | None = None) -> str:
    """A model that exists: a model folder, or a registry version, alias or bare NAME (its production alias) that
    resolves now. Returned as given: the flow resolves it once itself, at its start."""
    from tasks.models.card import ENTRY_FILE
    from tasks.models.registry import SCHEME, get_model

    if not model.startswith(SCHEME):
        if (Path(model).expanduser() / ENTRY_FILE).is_file():
            return model
        if "/" in model:
            raise ValueError(f"model {model!r} is neither a model folder (no {ENTRY_FILE} in it) nor a registry "
                             "reference; give models:/NAME/VERSION, models:/NAME@ALIAS, NAME or a model folder")
    get_model(model, registry)
    return model


def one_line(e: ValidationError) -> ValueError:
    """A config's pydantic errors as one ValueError line naming each bad value (a validator's own sentence as it
    is), for the CLI and for a failed run's state message alike."""
    lines = []
    for err in e.errors():
        message = err["msg"].removeprefix("Value error, ")
        name = ".".join(str(part) for part in err["loc"])
        lines.append(message if err["type"] == "value_error" else f"{name} {err.get('input')!r}: {message}")
    return ValueError("; ".join(lines))
