"""The model registry: entries, weights, importers and the architectures a2k builds."""

STAGED_VERSION = "0"  # a model folder before the registry numbers it (a compress child, a training or import run)


def model_label(name: str, version: str) -> str:
    """How logs and summaries name a model version: `NAME v3`, or a staged folder as what it is (not `v0`)."""
    return f"{name} (staged, not registered yet)" if str(version) == STAGED_VERSION else f"{name} v{version}"
