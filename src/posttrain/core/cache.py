"""Where posttrain keeps what it can compute again (converted models, generations, scores, tokenized data), and the
content digests that key it."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache" / "posttrain"))


def digest_files(files: list[Path]) -> str:
    """sha256 over the names and bytes of ``files``, memoized by (path, size, mtime) in ``fingerprints.json``, so an
    unchanged multi-gigabyte file is read once."""
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    memo_file = cache_root() / "fingerprints.json"
    try:
        memo = json.loads(memo_file.read_text()) if memo_file.exists() else {}
    except json.JSONDecodeError:
        memo = {}  # cut by a kill mid-write: recomputed
    key = hashlib.sha256(json.dumps(stats).encode()).hexdigest()
    if key not in memo:
        digest = hashlib.sha256()
        for f in files:
            digest.update(f.name.encode())
            with open(f, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 24), b""):
                    digest.update(block)
        memo[key] = digest.hexdigest()
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        staged = memo_file.with_name(f".{memo_file.name}.{os.getpid()}")
        staged.write_text(json.dumps(memo))
        os.replace(staged, memo_file)
    return memo[key]
