"""Reading an engine directory's manifest.json (written by sdrt.export; schema in export/manifest.schema.json)."""

from __future__ import annotations

import json
from pathlib import Path

from sdrt.runtime.errors import UserError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


def read_manifest(engine_dir: Path) -> dict | None:
    """The manifest, or None for a folder without one (e.g. exported by optimum-cli)."""
    path = Path(engine_dir) / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not a readable manifest ({e}); re-export the model with `sdrt export`") from None
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(
            f"{path} has manifest format version {version}, newer than this sdrt reads ({FORMAT_VERSION}); "
            "upgrade sdrt or re-export with this version")
    return manifest
