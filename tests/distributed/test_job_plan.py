"""How the job asks Ray for CPUs on a CPU-only cluster (the local Ray of these tests: 2 CPUs)."""

from __future__ import annotations

import pytest

from pipeline.distributed.job import READER_CPUS, WRITE_CPUS, _cpus_per_actor, build_dataset
from pipeline.io.storage import StorageOptions, join_uri
from pipeline.layout import RunLayout

from audit_data import job_config, write_audit

pytestmark = pytest.mark.timeout(300)


def test_without_a_gpu_each_actor_fetches_explains_and_renders_its_own_batches(local_ray, tmp_path, rng, capsys) -> None:
    root, options = str(tmp_path), StorageOptions()
    manifest, _ = write_audit(root, options, rng)
    config = job_config(root, options, manifest, "plan", num_actors=2)
    build_dataset(config, RunLayout(config.output, "plan", "2026-01-01", "a1"), gpus=0).explain()
    physical = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    assert "ActorPoolMapOperator[MapBatches(StageChain)]" in physical
    for stage in ("FetchImages", "ExplainPairs", "RenderResults"):  # no pixels through the object store
        assert stage not in physical


@pytest.mark.parametrize("num_actors", [1, 2])
def test_the_reader_and_the_writers_fit_beside_the_actors(local_ray, tmp_path, num_actors: int) -> None:
    """While the manifest reader holds its CPU, every actor and every write task still gets its share:
    results are written from the start, not held until the reader is done."""
    config = job_config(str(tmp_path), StorageOptions(), join_uri(str(tmp_path), "pairs.parquet"), "plan",
                        num_actors=num_actors)
    assert num_actors * (_cpus_per_actor(config, gpus=0) + WRITE_CPUS) + READER_CPUS <= 2
