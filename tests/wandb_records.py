"""Reads the records of an offline wandb run (``run-<id>.wandb``) without the network: the
summary, the logged keys, the artifacts and the saved media, so tests can check what a run
recorded. The file is W&B's append-only log: a 7-byte header, then 32 KiB blocks of records,
each with a 7-byte header (CRC, length, type: full / first / middle / last)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterator

BLOCK, HEADER = 32768, 7


def _chunks(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb run file")
    position, pending = 7, b""
    while position + HEADER <= len(data):
        left = BLOCK - position % BLOCK
        if left < HEADER:  # the block's tail is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + HEADER])
        position += HEADER
        chunk = data[position : position + length]
        position += length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
        else:
            break


def read_run(folder: Path) -> dict[str, Any]:
    """``{"run": {...}, "summary": {key: value}, "logged": set of keys, "artifacts": [(name, type,
    [paths])], "files": [paths]}`` of one offline run folder. Summary keys of nested values (a
    table, an image) are joined with "/"; logged keys are the top-level names."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = Path(folder).glob("run-*.wandb")
    out: dict[str, Any] = {"run": {}, "summary": {}, "logged": set(), "artifacts": [], "files": []}
    for chunk in _chunks(path):
        record = pb.Record()
        record.ParseFromString(chunk)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out["run"] = {
                "id": run.run_id,
                "project": run.project,
                "group": run.run_group,
                "job_type": run.job_type,
            }
        elif kind == "summary":
            for item in record.summary.update:
                key = "/".join(item.nested_key) if item.nested_key else item.key
                out["summary"][key] = json.loads(item.value_json)
        elif kind == "history":
            for item in record.history.item:
                out["logged"].add(item.nested_key[0] if item.nested_key else item.key)
        elif kind == "artifact":
            paths = [entry.path for entry in record.artifact.manifest.contents]
            out["artifacts"].append((record.artifact.name, record.artifact.type, paths))
        elif kind == "files":
            out["files"] += [f.path for f in record.files.files]
    return out


def runs_by_job(run_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Every offline run under ``<run_dir>/wandb``, grouped by job type (a resumed stage has
    several folders with one id)."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for folder in sorted((Path(run_dir) / "wandb").glob("offline-run-*")):
        run = read_run(folder)
        grouped.setdefault(run["run"]["job_type"], []).append(run)
    return grouped
