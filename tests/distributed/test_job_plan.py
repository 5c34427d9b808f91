"""How the job asks Ray for CPUs on a CPU-only cluster (the local Ray of these tests: 2 CPUs), and
how many actors it starts for the GPUs a cluster has."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import ray
from pydantic import ByteSize

from pipeline.distributed import resources
from pipeline.distributed.job import build_dataset, run_audit
from pipeline.distributed.resources import (
    CPU_ACTORS,
    CPU_BATCH_SIZE,
    FETCH_CPUS,
    GPU_BATCH_SIZE,
    GPU_REPLICAS,
    READER_CPUS,
    RENDER_CPUS,
    WRITE_CPUS,
    batch_size_for,
    check_actor_memory,
    cpus_per_actor,
    gpus_per_actor,
    num_actors_for,
)
from pipeline.errors import UserError
from pipeline.io.storage import StorageOptions, join_uri
from pipeline.layout import RunLayout
from pipeline.manifest import open_manifest, validate_manifest

from audit_data import job_config, write_audit, write_weights

pytestmark = pytest.mark.timeout(300)


def test_without_a_gpu_each_actor_fetches_explains_and_renders_its_own_batches(local_ray, tmp_path, rng, capsys) -> None:
    root, options = str(tmp_path), StorageOptions()
    manifest, _ = write_audit(root, options, rng)
    config = job_config(root, options, manifest, "plan", num_actors=2)
    info = validate_manifest(open_manifest(manifest, options))
    build_dataset(config, RunLayout(config.output, "plan", "2026-01-01", "a1"), gpus=0, manifest=info).explain()
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
    assert num_actors * (cpus_per_actor(config, gpus=0) + WRITE_CPUS) + READER_CPUS <= 2


@pytest.mark.parametrize(("cluster_gpus", "gpus_per_actor", "num_actors", "actors", "waits"), [
    (0, 0.0, None, CPU_ACTORS, False),  # no GPU: CPU actors
    (1, 1.0, None, 1, False),  # one per GPU
    (4, 1.0, None, 4, False),
    (1, 0.2, None, 5, False),  # fractional shares: 1 / 0.2 is 5, not 1 // 0.2 = 4
    (1, 0.1, None, 10, False),
    (0, 1.0, None, 1, True),  # GPUs asked for where the cluster has none yet (an autoscaler's): one waits
    (1, 2.0, None, 1, True),
    (1, 1.0, 2, 2, True),  # more than the GPUs: the extra one waits
    (2, 1.0, 2, 2, False),
])
def test_actors_for_the_gpus_the_cluster_has(monkeypatch, caplog, cluster_gpus, gpus_per_actor, num_actors, actors,
                                             waits) -> None:
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": float(cluster_gpus)})
    monkeypatch.setattr(resources, "started_here", lambda: False)  # a cluster, whose autoscaler may add GPUs
    config = job_config("/tmp/x", StorageOptions(), "/tmp/x/pairs.parquet", "plan", num_actors=num_actors,
                        gpus_per_actor=gpus_per_actor)
    with caplog.at_level(logging.WARNING, logger="sfam.audit"):
        assert num_actors_for(config, gpus_per_actor) == actors
    assert any("wait for GPUs" in record.getMessage() for record in caplog.records) == waits


@pytest.mark.parametrize(("cluster_gpus", "cluster_cpus", "given", "gpus", "batch", "actors", "cpus"), [
    (0, 16, {}, 0.0, CPU_BATCH_SIZE, CPU_ACTORS, 1.0),  # no GPU: CPU actors, batches of 32
    (1, 16, {}, 1 / GPU_REPLICAS, GPU_BATCH_SIZE, GPU_REPLICAS, 1.0),  # several replicas share each GPU
    (2, 16, {}, 1 / GPU_REPLICAS, GPU_BATCH_SIZE, 2 * GPU_REPLICAS, 1.0),
    (1, 4, {}, 1 / GPU_REPLICAS, GPU_BATCH_SIZE, GPU_REPLICAS, 0.25),  # few CPUs: the actors share what is left
    (1, 16, {"gpus_per_actor": 1.0, "batch_size": 16}, 1.0, 16, 1, 1.0),  # what the config says
    (0, 16, {"gpus_per_actor": 0.5}, 0.5, GPU_BATCH_SIZE, 1, 1.0),  # GPUs an autoscaler adds
])
def test_gpu_defaults(monkeypatch, cluster_gpus, cluster_cpus, given, gpus, batch, actors, cpus) -> None:
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": float(cluster_cpus), "GPU": float(cluster_gpus)})
    monkeypatch.setattr(resources, "started_here", lambda: False)
    config = job_config("/tmp/x", StorageOptions(), "/tmp/x/pairs.parquet", "plan",
                        **{"num_actors": None, "batch_size": None, **given})
    assert gpus_per_actor(config) == gpus
    assert batch_size_for(config, gpus) == batch
    config = config.model_copy(update={"num_actors": num_actors_for(config, gpus)})
    assert config.num_actors == actors
    assert cpus_per_actor(config, gpus) == cpus
    if gpus:  # from 6 CPUs per GPU, the actors leave the reader, the writers, a fetch and a render task their CPUs
        fits = actors * (cpus + WRITE_CPUS) + READER_CPUS + FETCH_CPUS + RENDER_CPUS <= cluster_cpus
        assert fits == (cluster_cpus >= 6 * max(cluster_gpus, 1))


@pytest.mark.parametrize(("cluster_gpus", "gpus_per_actor"), [(0, 1.0), (1, 2.0)])
def test_gpus_a_local_ray_cannot_have_are_refused(local_ray, monkeypatch, cluster_gpus, gpus_per_actor) -> None:
    """Where the job started its own Ray, no autoscaler adds the GPUs that no actor fits in: the
    job waited for them forever; it now stops with one line naming gpus_per_actor."""
    assert resources.started_here()  # the fixture's ray.init started a local Ray in this process
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": float(cluster_gpus)})
    config = job_config("/tmp/x", StorageOptions(), "/tmp/x/pairs.parquet", "plan", gpus_per_actor=gpus_per_actor)
    with pytest.raises(UserError, match=f"gpus_per_actor={gpus_per_actor:g}, but this machine has {cluster_gpus} GPU"):
        num_actors_for(config, gpus_per_actor)


def test_actor_memory_is_reserved_for_each_replica(local_ray, tmp_path, rng) -> None:
    """What Ray Data's high-memory warning asks for (`memory=`): each replica holds actor_memory of
    Ray's memory resource while it runs."""
    root, options = str(tmp_path), StorageOptions()
    write_weights(join_uri(root, "models", "model.pt"), options)
    manifest, rows = write_audit(root, options, rng, queries=2, top_k=8)
    total = ray.cluster_resources()["memory"]
    free: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            free.append(ray.available_resources().get("memory", total))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        summary = run_audit(job_config(root, options, manifest, "memory", num_actors=2, actor_memory="300MiB"))
    finally:
        stop.set()
        watcher.join(timeout=30)
    assert summary.ok == len(rows)
    assert total - min(free) == pytest.approx(2 * 300 * 2**20, rel=1e-6)


def test_actor_memory_a_local_ray_cannot_hold_is_refused(local_ray, monkeypatch, caplog) -> None:
    """Replicas beyond the memory of the Ray the job started would wait forever: one line naming
    actor_memory. A cluster's autoscaler may add nodes: a warning."""
    memory = ray.cluster_resources()["memory"]
    config = job_config("/tmp/x", StorageOptions(), "/tmp/x/pairs.parquet", "plan", num_actors=2,
                        actor_memory=int(memory // 2) + 1)
    with pytest.raises(UserError, match=r"^num_actors x actor_memory = 2 x [0-9.]+GiB, but Ray has [0-9.]+GiB of "
                                        r"memory for tasks and actors on this machine: lower actor_memory"):
        check_actor_memory(config)
    check_actor_memory(config.model_copy(update={"num_actors": 1}))  # fits
    with pytest.raises(UserError, match=r"^actor_memory = [0-9.]+GiB, but no node has that much memory"):
        check_actor_memory(config.model_copy(update={"num_actors": 1, "actor_memory": ByteSize(int(memory) + 1)}))
    monkeypatch.setattr(resources, "started_here", lambda: False)
    with caplog.at_level(logging.WARNING, logger="sfam.audit"):
        check_actor_memory(config)
    assert "wait for nodes an autoscaler may add" in caplog.text
