"""glibc malloc tuning (net.malloc): a transfer's chunk-sized buffers reuse heap memory instead
of faulting in fresh pages for every chunk."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from hubproxy.net.malloc import tune_malloc

glibc_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="mallopt's thresholds are glibc's",
)

# What a pass does per chunk: a ciphertext read, the plaintext joined from records, the
# ciphertext written; one plaintext chunk still held by the other side while the next arrives.
CHUNKS = """
import resource, sys
from hubproxy.net.malloc import tune_malloc
if sys.argv[1] == "tuned":
    assert tune_malloc()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
held = []
start = faults()
for _ in range(2000):
    received = bytes(256 * 1024 + 1024)
    plain = b"".join([received[: 128 * 1024], received[128 * 1024 :]])
    sent = bytes(256 * 1024 + 512)
    held.append(plain)
    if len(held) > 2:
        held.pop(0)
    del received, sent
print(faults() - start)
"""


def _faults(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", CHUNKS, mode], capture_output=True, text=True, check=True
    )
    return int(done.stdout)


@glibc_only
def test_tuned_malloc_reuses_chunk_buffers() -> None:
    # untuned, glibc gives each chunk fresh pages: some 6,000 faults per 500 chunks here
    assert _faults("tuned") < 2000


@glibc_only
def test_tune_malloc_reports_success_on_glibc() -> None:
    assert tune_malloc() is True
