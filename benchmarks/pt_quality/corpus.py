"""The offline corpus of the quality study: Python source files of packages installed in this environment, as bytes.

No download is possible on the device, and no PT checkpoint is public, so the study trains byte-level models
(vocabulary 256: no tokenizer to ship) on code that every machine here has. The corpus is built once on the CPU
machine and carried to the device as one compressed file; its manifest names the packages, their versions and a
hash of the bytes, so a result can be traced to its data. Files go to the held-out split by a hash of their path,
so validation code is never seen in training (whole files, not windows of a file seen elsewhere).

    python -m benchmarks.pt_quality.corpus --out .ptq/corpus.npz
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os

import numpy as np

DEFAULT_PACKAGES = ("torch", "numpy", "sympy", "networkx", "matplotlib", "setuptools", "pip")
SEPARATOR = b"\x00"  # between files; never inside Python source


def _package_files(package: str) -> list[str]:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package {package!r} is not installed here; installed candidates: {', '.join(DEFAULT_PACKAGES)}")
    root = spec.submodule_search_locations[0]
    files = [os.path.join(d, f) for d, _, names in os.walk(root) for f in names if f.endswith(".py")]
    return sorted(files)


def _bucket(path: str) -> int:
    """0..99 from the path below site-packages: the same file lands in the same split everywhere."""
    rel = path[path.index("site-packages") + 14 :] if "site-packages" in path else path
    return int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 100


def build(packages: list[str], train_bytes: int, val_bytes: int, val_percent: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Files in a fixed pseudo-random order (by path hash, so packages interleave), split by `val_percent`."""
    files = [f for p in packages for f in _package_files(p)]
    files.sort(key=lambda f: hashlib.sha1(f.encode()).hexdigest())
    train, val, n_train, n_val = [], [], 0, 0
    for path in files:
        with open(path, "rb") as fh:
            data = fh.read() + SEPARATOR
        if _bucket(path) < val_percent:
            if n_val < val_bytes:
                val.append(data)
                n_val += len(data)
        elif n_train < train_bytes:
            train.append(data)
            n_train += len(data)
        if n_train >= train_bytes and n_val >= val_bytes:
            break
    train_arr = np.frombuffer(b"".join(train), dtype=np.uint8)[:train_bytes]
    val_arr = np.frombuffer(b"".join(val), dtype=np.uint8)[:val_bytes]
    manifest = {
        "source": "Python source files (*.py) of installed packages, byte-level",
        "packages": {p: importlib.metadata.version(p) for p in packages},
        "train_bytes": int(train_arr.size), "val_bytes": int(val_arr.size), "val_percent_of_files": val_percent,
        "sha256": hashlib.sha256(train_arr.tobytes() + val_arr.tobytes()).hexdigest(),
    }
    return train_arr, val_arr, manifest


def save(path: str, train: np.ndarray, val: np.ndarray, manifest: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez_compressed(path, train=train, val=val, manifest=np.frombuffer(json.dumps(manifest).encode(), dtype=np.uint8))


def load(path: str) -> tuple[np.ndarray, np.ndarray, dict]:
    with np.load(path) as f:
        return f["train"], f["val"], json.loads(f["manifest"].tobytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--packages", nargs="+", default=list(DEFAULT_PACKAGES))
    parser.add_argument("--train-bytes", type=int, default=48_000_000)
    parser.add_argument("--val-bytes", type=int, default=1_000_000)
    parser.add_argument("--val-percent", type=int, default=3)
    args = parser.parse_args()
    train, val, manifest = build(args.packages, args.train_bytes, args.val_bytes, args.val_percent)
    save(args.out, train, val, manifest)
    print(json.dumps(manifest, indent=2), f"\n{os.path.getsize(args.out) / 1e6:.1f} MB at {args.out}")


if __name__ == "__main__":
    main()
