"""Writing files so that a killed run never leaves half of one: one helper for every stage.

A reader sees the old file or the new one. The temp file sits in the same folder because
os.replace is atomic only within one file system; fsync before the rename so a crash cannot
leave the new name pointing at empty data.
"""
from __future__ import annotations

import io
import json
import os
import secrets
from pathlib import Path


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write text (UTF-8) or bytes to `path` atomically; the parent folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temp, "xb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)  # only still there if something failed before replace
    return path


def write_json(path: str | Path, value) -> Path:
    """Pretty UTF-8 JSON (Chinese kept readable, not \\u escaped), atomically."""
    return write_atomic(path, json.dumps(value, ensure_ascii=False, indent=2) + "\n")


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    """One JSON object a line, atomically."""
    return write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_if_changed(path: str | Path, data: bytes) -> Path:
    """Leave an identical file alone, so rerunning a finished step changes nothing on disk."""
    path = Path(path)
    if not (path.is_file() and path.read_bytes() == data):
        write_atomic(path, data)
    return path


def save_png(fig, path: str | Path, dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG (atomically, untouched when identical) and close it.

    Rendering into memory first lets write_if_changed compare bytes: matplotlib's PNG output
    is deterministic for the same figure, so a rerun does not rewrite committed plots."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    plt.close(fig)
    return write_if_changed(path, buffer.getvalue())
