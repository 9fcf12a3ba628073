"""a2k's logic, one package per subsystem in the order data flows: images (list, read, decode), classify (plan,
shard, infer, sink, state, commit), models (entry, registry, importers), compress (recipes and their handlers),
train (train, evaluate, demo data). Nothing here imports `flows` or the CLI (`a2k`).

Importing the package sets the one thing that must come before torch starts CUDA in the process.
"""

import os
import sys

# The GPU takes work from a few hardware queues, 8 by default, shared by all the process's CUDA streams: DALI's
# decoder alone uses dozens, so the model's stream shares a queue with some of them and each waits behind the
# other's unrelated work; decoding and inference then take turns on the card instead of overlapping
# (bench/NOTES.md, variant 14). The driver reads this when CUDA starts in the process (before any CUDA call of a2k's); a value
# the user set is kept.
_SET_BY_USER = "CUDA_DEVICE_MAX_CONNECTIONS" in os.environ
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")
# True when torch had started CUDA in this process before this package was imported (a notebook that touched the
# GPU first): the setting above came too late for the driver, and a shard worker on the GPU (tasks.classify.shard)
# says so
CUDA_STARTED_FIRST = not _SET_BY_USER and "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized()
