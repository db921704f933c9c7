"""How long hubproxy's cache takes to rebuild its index at start, for N blobs.

    python -m bench.cache_index [N]      (default 100000; as root it also drops the page cache
                                          first, so the scan reads the directory cold)

Creates N one-byte blobs under a temporary directory laid out as the cache lays them out, then
times ``BlobStore.open()`` on it and prints one line.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from hubproxy.cache.store import BlobStore


def main(argv: list[str]) -> int:
    count = int(argv[0]) if argv else 100_000
    root = Path(tempfile.mkdtemp(prefix="hubproxy-index-", dir="/var/tmp"))
    try:
        store = BlobStore(root, 1 << 40)
        store.open()
        for i in range(count):
            key = hashlib.sha256(i.to_bytes(8, "big")).hexdigest()
            directory = store.blob_dir / key[:2]
            directory.mkdir(exist_ok=True)
            (directory / key).write_bytes(b"x")
        os.sync()
        cold = False
        if os.geteuid() == 0:
            try:
                Path("/proc/sys/vm/drop_caches").write_text("3\n")
                cold = True
            except OSError:
                pass
        started = time.perf_counter()
        rebuilt = BlobStore(root, 1 << 40)
        rebuilt.open()
        elapsed = time.perf_counter() - started
        state = "cold" if cold else "warm"
        print(f"cache index rebuild: {len(rebuilt.index)} blobs in {elapsed:.2f} s ({state})")
        return 0 if len(rebuilt.index) == count else 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
