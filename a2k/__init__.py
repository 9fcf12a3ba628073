"""a2k: GPU batch image classification with Prefect flows, NVIDIA DALI decoding and Parquet output."""

__version__ = "0.1.0"
