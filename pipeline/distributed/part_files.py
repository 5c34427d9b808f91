"""The names of the result files an attempt writes, in a module of their own: Ray's write tasks
import it (and Ray) only, not the job's module with torch and the models."""

from __future__ import annotations

from ray.data.datasource import FilenameProvider


class PartFiles(FilenameProvider):
    """part-ATTEMPT-NNNNN-UUID.parquet: the attempt in every name, so commits never overwrite."""

    def __init__(self, prefix: str) -> None:
        super().__init__(file_format="parquet")
        self.prefix = prefix

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"{self.prefix}{task_index:05d}-{write_uuid}.parquet"
