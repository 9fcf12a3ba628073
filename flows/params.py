"""Parameter types shared by the flows: each constraint is written once and checked by pydantic."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field

from tasks.devices import check_device_spec
from tasks.runner import TaskRunnerKind

BatchSize = Annotated[int, Field(ge=1, le=8192, description="images per GPU/CPU batch")]
ShardSize = Annotated[int, Field(ge=1, le=1_000_000, description="images per shard (one task and one Parquet part each)")]
TopK = Annotated[int, Field(ge=1, le=1000, description="how many best classes to keep per image")]
DeviceSpec = Annotated[str, AfterValidator(check_device_spec), Field(description="auto, cpu, cuda or cuda:N")]
Threads = Annotated[int, Field(ge=1, le=256, description="DALI CPU threads")]
Epochs = Annotated[int, Field(ge=1, le=10_000)]
Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]
HwDecoderLoad = Annotated[float, Field(ge=0.0, le=1.0, description="share of JPEG decoding on the GPU's hardware decoder")]
GpuMemoryGb = Annotated[float, Field(gt=0, le=4096, description="GiB of GPU memory to use, e.g. 6 to run as an RTX A2000 6 GB")]
TaskRunnerChoice = Annotated[
    TaskRunnerKind,
    Field(description="local: shards one at a time in the flow's process; dask: on a Dask cluster (prefect-dask)"),
]
DaskAddress = Annotated[str, Field(min_length=1, description="address of a running Dask scheduler, e.g. tcp://host:8786")]
DaskWorkers = Annotated[int, Field(ge=1, le=1024, description="workers of the temporary local Dask cluster")]
