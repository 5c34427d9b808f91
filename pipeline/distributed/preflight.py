"""The job's pre-flight check: everything that can be checked before any work starts, on the driver.

The config's JPEG decoder, the manifest (readable, its schema, some of its first images there),
the gates' columns, the model (builds, weights load, layers resolve) and one trial
explanation of random pictures on the driver's CPU. It writes and deletes nothing.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

import torch
import torchvision

from pipeline.config import ConfigError, JobConfig
from pipeline.gates import check_manifest_supports
from pipeline.io.images import torchvision_has_jpeg_decoder
from pipeline.io.results_store import ResultsStore
from pipeline.io.storage import StorageError, exists, redact_uri, resolve_uri
from pipeline.layout import RunLayout, new_attempt_id
from pipeline.manifest import ManifestError, ManifestInfo, manifest_dir, open_manifest, validate_manifest
from pipeline.models.explainer import build_explainer
from pipeline.models.loading import random_weights_warning
from pipeline.models.spec import ModelSpec

log = logging.getLogger("sfam.audit")


@dataclass(frozen=True)
class Plan:
    """What the pre-flight check found: the run can start."""

    manifest: ManifestInfo
    layout: RunLayout
    target_layer: str
    model: ModelSpec  # the config's, its weights pinned to the SHA-256 of the file that was checked (every replica's)
    previous_attempt: str | None


def preflight(config: JobConfig, store: ResultsStore) -> Plan:
    """Checks everything that can be checked before work starts; writes and deletes nothing.

    The manifest (exists, readable, schema), the model (builds, weights load, layers resolve)
    and one trial explanation of random pictures on the driver's CPU.
    """
    options = config.storage_options
    if config.jpeg_decoder == "torchvision" and not torchvision_has_jpeg_decoder():
        raise ConfigError(f"jpeg_decoder: torchvision {torchvision.__version__} no longer decodes JPEGs; "
                          "use auto or pillow")
    try:
        manifest = validate_manifest(open_manifest(config.manifest, options))
    except StorageError as error:  # name the key
        raise type(error)(f"manifest {config.manifest}", error.reason) from error
    log.info("manifest %s: %d pairs, boxes: %s", redact_uri(config.manifest), manifest.num_rows, manifest.has_boxes)
    if manifest.folder_columns.num_columns and "path" in manifest.schema.names:  # the file column job.py's _read_manifest adds
        raise ManifestError("manifest column 'path' cannot be read beside Hive folder columns "
                            f"({', '.join(manifest.folder_columns.column_names)}=...); rename it")
    _check_some_images_exist(config, manifest.first_images)
    check_manifest_supports(config.gates, manifest.schema.names)
    explainer = build_explainer(config.model, options, device=torch.device("cpu"))  # GPUs belong to the actors
    explainer.trial()
    random_weights = random_weights_warning(config.model)  # once the model is known to build: not before an error
    if random_weights:  # told now, before a long run; the run's summary and run.json say it again
        log.warning("%s", random_weights)
    log.info("model %s checked: target layer %s", config.model.model_id, explainer.target_layer)
    layout = RunLayout(config.output, config.run_id, dt.datetime.now(dt.timezone.utc).date().isoformat(), new_attempt_id())
    return Plan(manifest=manifest, layout=layout, target_layer=str(explainer.target_layer), model=explainer.spec,
                previous_attempt=store.committed_attempt(config.run_id))


def _check_some_images_exist(config: JobConfig, uris: tuple[str, ...]) -> None:
    """Refuses a manifest none of whose first images (`uris`, ManifestInfo.first_images) exists: a
    path mistake (URIs relative to another folder than the manifest's), which would fail every row
    after the whole run. One missing image among others fails only its rows."""
    locations = [resolve_uri(uri, manifest_dir(config.manifest)) for uri in uris]
    if not any(exists(location, config.storage_options) for location in locations):
        relative = uris[0] != locations[0]
        raise ManifestError(f"none of the {len(uris)} distinct images of the manifest's first rows exists, e.g. {uris[0]!r}"
                            + (f", looked for at {redact_uri(locations[0])}: relative URIs are read from the manifest's "
                               "folder" if relative else ""))
