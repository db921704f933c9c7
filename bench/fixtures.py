"""What the origin serves and everyone trusts: one trustme CA, a server certificate for
``localhost``/``127.0.0.1``, random blob files on /dev/shm named by their sha256 (computed as
they are written), an image manifest (~2 KiB, or of a given size), and on request a big one
(bench.load's abuse mode)."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import trustme

MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
_WRITE_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class Blob:
    digest_hex: str
    size: int
    path: Path


@dataclass(frozen=True)
class TLSFiles:
    ca_pem: Path
    cert_pem: Path
    key_pem: Path


@dataclass
class Fixtures:
    root: Path
    tls: TLSFiles
    blob_dir: Path
    manifest_path: Path
    manifest_digest: str
    blobs: dict[tuple[int, int], list[Blob]] = field(default_factory=dict)
    big_manifest_path: Path | None = None  # served under every tag of nginxconf.BIG_MANIFEST_PATH
    big_manifest_digest: str = ""
    # big_manifest_variants files "miss-<i>.json": the big manifest made distinct per tag (each
    # padded with i more spaces: still valid JSON, another digest), so misses are distinct
    big_manifest_dir: Path | None = None


def make_tls(directory: Path) -> TLSFiles:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    files = TLSFiles(directory / "ca.pem", directory / "server.pem", directory / "server-key.pem")
    ca.cert_pem.write_to_path(str(files.ca_pem))
    files.cert_pem.write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(files.key_pem))
    return files


def write_blob(directory: Path, size: int) -> Blob:
    """``size`` random bytes into ``directory/<sha256 hex>``, hashed while written."""
    digest = hashlib.sha256()
    tmp = directory / f".tmp-{secrets.token_hex(8)}"
    with tmp.open("wb") as out:
        left = size
        while left:
            chunk = os.urandom(min(_WRITE_CHUNK, left))
            digest.update(chunk)
            out.write(chunk)
            left -= len(chunk)
    hex_digest = digest.hexdigest()
    path = directory / hex_digest
    tmp.rename(path)
    path.chmod(0o644)
    return Blob(hex_digest, size, path)


def manifest_json(layers: int = 10) -> bytes:
    """A schema-2 image manifest of about 2 KiB (random digests: it is never pulled)."""

    def descriptor(media_type: str, size: int) -> dict[str, object]:
        return {
            "mediaType": media_type,
            "size": size,
            "digest": "sha256:" + secrets.token_hex(32),
        }

    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": descriptor("application/vnd.docker.container.image.v1+json", 1469),
        "layers": [
            descriptor("application/vnd.docker.image.rootfs.diff.tar.gzip", 1_000_000 + i)
            for i in range(layers)
        ],
    }
    return json.dumps(manifest, indent=3).encode() + b"\n"


def manifest_of_size(size: int) -> bytes:
    """A schema-2 manifest of at most ``size`` bytes and close to it (as many layers as fit)."""
    one, two = len(manifest_json(1)), len(manifest_json(2))
    layers = max(1, (size - one) // (two - one) + 1)
    body = manifest_json(layers)
    while len(body) > size and layers > 1:  # descriptor sizes vary by a digit or two
        layers -= 1
        body = manifest_json(layers)
    return body


def manifest_exactly(size: int) -> bytes:
    """A schema-2 manifest of exactly ``size`` bytes: :func:`manifest_of_size` padded with
    spaces (whitespace between JSON tokens changes the digest, not the meaning)."""
    body = manifest_of_size(size).rstrip()
    return body + b" " * max(0, size - len(body) - 1) + b"\n"


def make_fixtures(
    root: Path,
    shapes: list[tuple[int, int]],
    big_manifest_size: int = 0,
    big_manifest_variants: int = 0,
    manifest_size: int = 0,
) -> Fixtures:
    """Certificates, the manifest (about ``manifest_size`` bytes if given, else ~2 KiB) and,
    per ``(count, size)`` shape, ``count`` distinct blobs; a manifest of about
    ``big_manifest_size`` bytes too, if given."""
    root.chmod(0o755)  # nginx workers run as an unprivileged user when we are root
    tls = make_tls(root)
    blob_dir = root / "blobs"
    blob_dir.mkdir(mode=0o755)
    manifest = manifest_exactly(manifest_size) if manifest_size else manifest_json()
    manifest_path = root / "manifest.json"
    manifest_path.write_bytes(manifest)
    manifest_path.chmod(0o644)
    fixtures = Fixtures(
        root=root,
        tls=tls,
        blob_dir=blob_dir,
        manifest_path=manifest_path,
        manifest_digest="sha256:" + hashlib.sha256(manifest).hexdigest(),
    )
    for count, size in shapes:
        fixtures.blobs[(count, size)] = [write_blob(blob_dir, size) for _ in range(count)]
    if big_manifest_size:
        big = manifest_of_size(big_manifest_size)
        fixtures.big_manifest_path = root / "big-manifest.json"
        fixtures.big_manifest_path.write_bytes(big)
        fixtures.big_manifest_path.chmod(0o644)
        fixtures.big_manifest_digest = "sha256:" + hashlib.sha256(big).hexdigest()
        if big_manifest_variants:
            variants = root / "big-manifests"
            variants.mkdir(mode=0o755)
            base = big.rstrip()  # the pads stay well under hubproxy's 4 MiB manifest limit
            for i in range(big_manifest_variants):
                path = variants / f"miss-{i}.json"
                path.write_bytes(base + b" " * (i + 1))
                path.chmod(0o644)
            fixtures.big_manifest_dir = variants
    return fixtures
