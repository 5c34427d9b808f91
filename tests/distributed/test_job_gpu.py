"""The audit job on a Ray cluster that has GPUs: GPU_REPLICAS model replicas share each GPU by default.

On a machine without CUDA, Ray is told it has one GPU, so the scheduling (gpus_per_actor
null -> 1/GPU_REPLICAS per actor, an actor pool larger than the GPUs) is tested everywhere; where
CUDA is present, Ray finds the real GPUs and the model must run on them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import ray
import torch

from pipeline.distributed.job import run_audit
from pipeline.distributed.resources import GPU_BATCH_SIZE, GPU_REPLICAS
from pipeline.io.results_store import HiveParquetStore
from pipeline.io.storage import StorageOptions, join_uri
from pipeline.io.tables import read_json

from audit_data import expected_similarities, job_config, write_audit, write_weights

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cluster_gpus() -> Iterator[int]:
    """A local Ray whose cluster has GPUs (declared on a machine without CUDA); yields their number."""
    declared = {} if torch.cuda.is_available() else {"num_gpus": 1}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, **declared)
    try:
        yield int(ray.cluster_resources()["GPU"])
    finally:
        ray.shutdown()


def test_one_gpu_per_actor_when_the_cluster_has_gpus(cluster_gpus, tmp_path, rng, caplog) -> None:
    root, options = str(tmp_path), StorageOptions()
    model = write_weights(join_uri(root, "models", "model.pt"), options)
    manifest, rows = write_audit(root, options, rng, queries=4, top_k=6, fmt="JPEG")
    # one actor more than there are GPUs: it waits for a GPU, the others do the work; beside GPUs the
    # actors decode the JPEGs (jpeg_decoder auto: nvJPEG where CUDA is, torchvision on the CPU here)
    config = job_config(root, options, manifest, "gpu", num_actors=cluster_gpus + 1, gpus_per_actor=1.0, render_png=False)
    with caplog.at_level(logging.INFO, logger="sfam.audit"):
        summary = run_audit(config)
    assert [r for r in caplog.records if "wait for GPUs" in r.getMessage()]
    assert [r for r in caplog.records if r.getMessage() == "JPEGs decoded by torchvision in the explain actors"]

    record = read_json(join_uri(config.output, "runs", "gpu", "run.json"), options)
    assert record["resources"]["gpus_per_actor"] == 1
    assert (summary.pairs, summary.ok) == (len(rows), len(rows))
    if torch.cuda.is_available():
        uuids = {f"GPU-{torch.cuda.get_device_properties(i).uuid}" for i in range(torch.cuda.device_count())}
        assert summary.devices and all(d.startswith("cuda ") and d.split()[-1] in uuids for d in summary.devices)
    else:
        assert summary.devices == ("cpu",)
    assert record["resources"]["devices"] == list(summary.devices)

    table = HiveParquetStore(config.output, options).read(run_id="gpu")
    expected = expected_similarities(model, rows, root, options)  # in this process, on the CPU, decoded by Pillow
    for pair_id, similarity in zip(table.column("pair_id").to_pylist(), table.column("similarity").to_pylist()):
        assert abs(similarity - expected[pair_id]) < 2e-2, pair_id


def test_replicas_share_each_gpu_by_default(cluster_gpus, tmp_path, rng, caplog) -> None:
    """num_actors, gpus_per_actor and batch_size unset: GPU_REPLICAS actors per GPU of the cluster,
    so none waits for a GPU, with batches of GPU_BATCH_SIZE pairs."""
    root, options = str(tmp_path), StorageOptions()
    write_weights(join_uri(root, "models", "model.pt"), options)
    manifest, rows = write_audit(root, options, rng, queries=2, top_k=3)
    config = job_config(root, options, manifest, "gpu-default", num_actors=None, batch_size=None, render_png=False)
    with caplog.at_level(logging.WARNING, logger="sfam.audit"):
        summary = run_audit(config)
    assert (summary.num_actors, summary.ok) == (cluster_gpus * GPU_REPLICAS, len(rows))
    record = read_json(join_uri(config.output, "runs", "gpu-default", "run.json"), options)
    assert record["resources"]["num_actors"] == cluster_gpus * GPU_REPLICAS and record["config"]["num_actors"] is None
    assert record["resources"]["gpus_per_actor"] == 1 / GPU_REPLICAS and record["config"]["gpus_per_actor"] is None
    assert record["resources"]["batch_size"] == GPU_BATCH_SIZE and record["config"]["batch_size"] is None
    assert not [r for r in caplog.records if "wait for GPUs" in r.getMessage()]
