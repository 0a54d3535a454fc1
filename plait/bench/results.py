"""Benchmark results as JSON, each stamped with the exact command, git commit, device and time."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys

import torch


def provenance() -> dict:
    """PLAIT_COMMIT first: a copied working tree (the device machines) can carry a .git older than its files."""
    commit = os.environ.get("PLAIT_COMMIT", "")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
        except OSError:
            pass
    cuda = torch.cuda.is_available()
    return {
        "command": " ".join(["plait", *sys.argv[1:]]) if sys.argv[0].endswith("plait") else " ".join(sys.argv),
        "git_commit": commit or "unknown",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}" if cuda else f"cpu {platform.processor() or platform.machine()}",
        "torch": torch.__version__,
    }


def write_result(result: dict, path: str | None) -> None:
    result.update(provenance())
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
