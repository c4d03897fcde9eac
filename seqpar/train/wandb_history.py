"""The history rows an offline wandb run holds, read from its ``.wandb`` files (wandb 0.31 has no Python reader).

A resumed run asks it which steps wandb already has: when SLURM signals every process of a job, wandb's
service process gets the SIGTERM too and the steps it had not written are missing; the logger sends them
again from metrics.jsonl (seqpar/train/logging.py). The tests use it to check that every step is there once.

Format: a 7-byte file header (``:W&B``, ident, version), then a LevelDB-style log: 32 KiB blocks of records,
each with a 7-byte header (crc32, little-endian length, type: 1 full, 2 first, 3 middle, 4 last; 0 padding)
whose payloads join into one ``wandb_internal_pb2.Record`` protobuf. A tail cut short by a kill is ignored.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK, HEADER = 32768, 7


def run_files(wandb_dir: Path, run_id: str) -> list[Path]:
    """The ``.wandb`` files of run ``run_id`` under ``wandb_dir`` (``<output_dir>/wandb``), oldest first."""
    return sorted(Path(wandb_dir).glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))


def history(path: Path) -> list[tuple[int, dict]]:
    """(step, {key: value}) of every history row in one ``.wandb`` file, in the order written."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, payload, rows = Path(path).read_bytes(), HEADER, b"", []
    if data[:4] != b":W&B":
        return rows
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER]) if left >= HEADER else (0, 0, 0)
        if kind == 0:  # the rest of the block is padding
            pos += left
            continue
        if pos + HEADER + length > len(data):
            break  # cut short
        payload, pos = payload + data[pos + HEADER:pos + HEADER + length], pos + HEADER + length
        if kind in (1, 4):
            record = pb.Record.FromString(payload)
            payload = b""
            if record.HasField("history"):
                rows.append((record.history.step.num,
                             {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}))
    return rows


def last_step(wandb_dir: Path, run_id: str) -> int:
    """The last step offline run ``run_id`` holds (0: none)."""
    return max((step for f in run_files(wandb_dir, run_id) for step, _ in history(f)), default=0)
