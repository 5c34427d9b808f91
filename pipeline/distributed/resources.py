"""How many explain actors the job starts, with how much of a GPU and a CPU each, and how many
pairs they explain per batch: from the config where it says, else from what the cluster has.

Ray Data's other stages hold their own shares beside the actors (the manifest reader, the
write tasks, and beside GPU actors the fetch and render tasks): `cpus_per_actor` leaves them those.
"""

from __future__ import annotations

import logging
import math

import ray
from pydantic import ByteSize

from pipeline.config import JobConfig
from pipeline.distributed.cluster import started_here
from pipeline.errors import UserError
from pipeline.io.images import torchvision_has_jpeg_decoder

log = logging.getLogger("sfam.audit")
RENDER_CPUS = 0.5  # a render task's share beside GPU actors: light under the default policy
READER_CPUS = 1.0  # Ray Data's manifest reader: its streaming repartition holds one CPU for the whole run
WRITE_CPUS = 0.25  # a Parquet write task; num_actors of them at most
FETCH_CPUS = 1.0  # a fetch task beside GPU actors
CPU_ACTORS = 2  # num_actors by default where the cluster has no GPU
# Beside GPUs, by default: replicas of 1/GPU_REPLICAS GPU each, batches of GPU_BATCH_SIZE pairs. On one H200
# (BENCHMARKS.md, "The whole job on a GPU: replicas and batch size"), 4 replicas of resnet50 explained 1.47 to
# 1.58x the pairs/s of 2, and batches of 128 pairs 2.0 to 2.3x those of 32: one replica's Python work and Ray Data's
# work per batch leave the GPU idle unless other replicas fill it.
GPU_REPLICAS = 4
GPU_BATCH_SIZE = 128
CPU_BATCH_SIZE = 32


def gpus_per_actor(config: JobConfig) -> float:
    """config.gpus_per_actor, or by default 1/GPU_REPLICAS where the cluster has a GPU now, else 0."""
    if config.gpus_per_actor is not None:
        return config.gpus_per_actor
    return 1 / GPU_REPLICAS if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def batch_size_for(config: JobConfig, gpus: float) -> int:
    """config.batch_size, or by default GPU_BATCH_SIZE where the actors hold `gpus` > 0 each, else CPU_BATCH_SIZE."""
    if config.batch_size is not None:
        return config.batch_size
    return GPU_BATCH_SIZE if gpus > 0 else CPU_BATCH_SIZE


def num_actors_for(config: JobConfig, gpus: float) -> int:
    """config.num_actors, or by default as many actors of `gpus` GPUs each as the cluster has GPUs
    for now (at least one), and CPU_ACTORS without GPUs. Refuses GPUs that a local Ray started by
    the job lacks; warns when the actors need more GPUs than a cluster has now (they wait for them)."""
    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    actors = config.num_actors
    if actors is None:
        actors = max(1, math.floor(cluster_gpus / gpus + 1e-9)) if gpus > 0 else CPU_ACTORS
    if gpus > cluster_gpus and started_here():
        raise UserError(f"gpus_per_actor={gpus:g}, but this machine has {cluster_gpus:g} GPU(s), and the local Ray the "
                        "job started cannot gain any: leave gpus_per_actor out (or 0) to explain on the CPU, or run "
                        "where there are GPUs (a GPU node, or `ray job submit` to a cluster that has or adds them)")
    if gpus > 0 and actors * gpus > cluster_gpus:
        log.warning("%d actor(s) x %g GPU each, but the cluster has %g GPU(s) now: the actors beyond that wait for "
                    "GPUs an autoscaler may add; num_actors x gpus_per_actor within the GPUs runs without waiting",
                    actors, gpus, cluster_gpus)
    return actors


def check_actor_memory(config: JobConfig) -> None:
    """Refuses replicas whose reserved memory (actor_memory) a local Ray cannot hold all at once,
    where they would wait forever; on a cluster, warns that they wait for nodes."""
    if config.actor_memory is None:
        return
    memory = config.actor_memory.human_readable()
    largest = max((node["Resources"].get("memory", 0) for node in ray.nodes() if node["Alive"]), default=0)
    available = ray.cluster_resources().get("memory", 0)
    if config.actor_memory > largest:
        text = (f"actor_memory = {memory}, but no node has that much memory for tasks and actors (the largest "
                f"{ByteSize(int(largest)).human_readable()})")
    elif config.num_actors * config.actor_memory > available:
        text = (f"num_actors x actor_memory = {config.num_actors} x {memory}, but Ray has "
                f"{ByteSize(int(available)).human_readable()} of memory for tasks and actors")
    else:
        return
    if started_here():
        raise UserError(f"{text} on this machine: lower actor_memory or num_actors, or leave actor_memory out")
    log.warning("%s now: the actors wait for nodes an autoscaler may add (a cluster without one never starts them)",
                text)


def cpus_per_actor(config: JobConfig, gpus: float) -> float:
    """At most one CPU per actor, at least a quarter: the actors share what the manifest reader and
    the write tasks leave, and GPU actors also what one fetch and one render task need, so that no
    stage waits for a CPU (a write task that waits holds every result back) where the cluster has
    the CPUs: from about 6 per GPU with the default 4 replicas. Counted when the job starts: GPU
    workers that an autoscaler adds later bring CPUs that these shares leave to the other stages."""
    cpus = ray.cluster_resources().get("CPU", 1) - READER_CPUS - WRITE_CPUS * config.num_actors
    if gpus > 0:
        cpus -= FETCH_CPUS + RENDER_CPUS
    return max(0.25, min(1.0, cpus / config.num_actors))


def decodes_jpegs_in_actors(config: JobConfig, gpus: float) -> bool:
    """Whether explain actors of `gpus` GPUs each decode the JPEGs (torchvision; nvJPEG on GPUs);
    `auto` never with a torchvision that no longer decodes them (preflight refuses `torchvision` then)."""
    automatic = config.jpeg_decoder == "auto" and gpus > 0 and torchvision_has_jpeg_decoder()
    return config.jpeg_decoder == "torchvision" or automatic
