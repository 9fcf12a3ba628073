"""The Prefect task of the images package: list a source into a manifest."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.images.manifest import describe_skipped, list_images, skipped_counts, write_manifest


@task(name="list-images", cache_policy=NO_CACHE)
def list_images_task(source: str, manifest_path: str) -> int:
    """List the source into a manifest file beside the output; returns the number of images."""
    table = list_images(source)
    write_manifest(table, manifest_path)
    labelled = table.num_rows - table.column("label").null_count
    get_run_logger().info("listed %d images (%d with a label from the folder layout) under %s; %s", table.num_rows,
                          labelled, source, describe_skipped(skipped_counts(table)))
    return table.num_rows
