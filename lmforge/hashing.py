"""Content hashes shared by the stages (pinned downloads, stage output fingerprints)."""

from __future__ import annotations

import hashlib
import os


def file_sha256(*paths: str | os.PathLike) -> str:
    """sha256 over the bytes of the given files, in order, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
