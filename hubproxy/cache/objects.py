"""Where verified blobs are committed: the local directory, or S3-compatible object storage.

Theory of operation. The blob cache (``store.py``) keeps its fast paths on the local disk: a
fill writes a temporary file while hashing, readers follow the growing file, hits go out with
``sendfile``. An :class:`ObjectStore` is the place a *verified* blob is committed to beside that,
so that other hubproxy instances (and this one after losing its disk) find it: the local
directory of today (:class:`LocalDirectory`) or a bucket (:class:`S3Objects`, ``--cache-store
s3://bucket/prefix``). Keys are the local layout's relative paths (``blobs/sha256/ab/ab...``), so
a bucket and a cache directory hold the same tree.

Rules every implementation keeps:

- a blob is committed create-only (:meth:`ObjectStore.put_new`, S3's ``If-None-Match: *``): two
  instances committing the same digest race harmlessly, and an object already there is accepted
  as the same content (the key is its digest) without being trusted: every read of it is
  verified again by the cache before its last byte reaches a client;
- the methods are synchronous and may block on the network; the trio side (``shared.py``) runs
  them in worker threads under a capacity limiter.

The S3 client is obstore (Rust, wheels on PyPI: ``pip install 'hubproxy[s3]'``): request
signing, credentials the AWS way (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/
``AWS_SESSION_TOKEN``, ``AWS_REGION``, ``AWS_PROFILE`` with ``~/.aws/config`` and
``~/.aws/credentials``, instance roles) and conditional puts come from there.
"""

from __future__ import annotations

import configparser
import os
import secrets
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

CHUNK = 1024 * 1024  # what a streamed read hands over at a time
PROBE_DIR = "probe"  # conditional-put probes at start live under this key prefix
INSTALL_HINT = "pip install 'hubproxy[s3]'"
# (key, size, modified in Unix seconds): named here, as ``list`` in a class body is the method
Listing = list[tuple[str, int, float]]


class StoreUnusable(Exception):
    """The object store cannot be used (no client library, a bad URL, conditional puts not
    honoured); the message is the one line saying what to do."""


class ObjectStore(Protocol):
    """What the cache needs from the place verified blobs are committed to."""

    description: str  # for log lines: ``s3://bucket/prefix at http://127.0.0.1:9000``

    def put_new(self, key: str, path: Path) -> bool:
        """Commit the file at ``path`` as ``key`` unless ``key`` exists: True if this call
        created it, False if it was there already (content-addressed: the same bytes)."""
        ...

    def put(self, key: str, path: Path) -> None:
        """Write ``key`` from the file at ``path``, replacing it (mutable state, not blobs)."""
        ...

    def size(self, key: str) -> int | None:
        """The size of ``key``, or None if there is no such object."""
        ...

    def chunks(self, key: str) -> Iterator[bytes]:
        """The bytes of ``key``, in order (FileNotFoundError if there is no such object)."""
        ...

    def read_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of ``key``."""
        ...

    def get_to(self, key: str, path: Path) -> bool:
        """Copy ``key`` to a new file at ``path``; False if there is no such object."""
        ...

    def delete(self, key: str) -> None:
        """Delete ``key`` (gone already is fine)."""
        ...

    def list(self, prefix: str) -> list[tuple[str, int]]:
        """Every ``(key, size)`` under ``prefix`` (eviction, inventory)."""
        ...

    def listing(self, prefix: str) -> Listing:
        """Every ``(key, size, modified)`` under ``prefix``, ``modified`` in Unix seconds by
        the store's clock (the bucket's budget: ``cache/bucket.py``)."""
        ...

    def put_bytes(self, key: str, data: bytes) -> None:
        """Write ``key`` holding ``data``, replacing it (access markers, leases)."""
        ...

    def presign(self, key: str, expires_in: timedelta) -> str | None:
        """A URL that lets whoever holds it GET ``key`` (``Range`` too) without credentials
        until ``expires_in`` passed (``--redirect-hits``); None: this store cannot make one.
        The URL carries a signature: it is never logged whole nor kept."""
        ...


def blob_key(hexpart: str) -> str:
    """The key of a sha256 blob: the cache directory's relative path."""
    return f"blobs/sha256/{hexpart[:2]}/{hexpart}"


def probe_conditional_put(store: ObjectStore, scratch: Path) -> None:
    """Put a probe key create-only twice: the second must be refused. Raises StoreUnusable
    when the store overwrote it (it ignores ``If-None-Match``: two instances committing the
    same blob could then replace a verified object with one being written). OSError and the
    client's own errors (unreachable, refused credentials) pass."""
    key = f"{PROBE_DIR}/{secrets.token_hex(8)}"
    scratch.write_bytes(b"hubproxy conditional put probe\n")
    try:
        if not store.put_new(key, scratch):
            raise StoreUnusable(f"{store.description}: a fresh probe key exists already")
        if store.put_new(key, scratch):
            raise StoreUnusable(
                f"{store.description} does not honour conditional puts (If-None-Match: *): "
                "blobs committed by several instances could overwrite each other; use a store "
                "that does (AWS S3, MinIO, Ceph RGW, R2) or drop --cache-store"
            )
    finally:
        scratch.unlink(missing_ok=True)
        try:  # best effort: a leftover probe is a few bytes under probe/, never read
            store.delete(key)
        except Exception:  # the client's own error family; the verdict above matters more
            pass


class LocalDirectory:
    """The cache directory as an :class:`ObjectStore` (today's store; the blob cache's own fast
    paths read and write it directly). Commits are a hard link, which fails if the name exists:
    create-only, atomic, and the source file stays where it was."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.description = str(root)

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"not a key: {key!r}")
        return self.root / key

    def put_new(self, key: str, path: Path) -> bool:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except FileExistsError:
            return False
        return True

    def put(self, key: str, path: Path) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f"{target.name}.{secrets.token_hex(6)}.partial")
        os.link(path, temp)
        os.replace(temp, target)

    def size(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None

    def chunks(self, key: str) -> Iterator[bytes]:
        with open(self._path(key), "rb") as file:
            while chunk := file.read(CHUNK):
                yield chunk

    def read_range(self, key: str, start: int, end: int) -> bytes:
        with open(self._path(key), "rb") as file:
            file.seek(start)
            return file.read(end - start)

    def get_to(self, key: str, path: Path) -> bool:
        try:
            with open(self._path(key), "rb") as source, open(path, "xb") as target:
                while chunk := source.read(CHUNK):
                    target.write(chunk)
        except FileNotFoundError:
            return False
        return True

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str) -> list[tuple[str, int]]:
        found = []
        base = self._path(prefix)
        for directory, _dirs, files in os.walk(base):
            for name in files:
                full = Path(directory) / name
                found.append((str(full.relative_to(self.root)), full.stat().st_size))
        return sorted(found)

    def listing(self, prefix: str) -> Listing:
        found = []
        for directory, _dirs, files in os.walk(self._path(prefix)):
            for name in files:
                full = Path(directory) / name
                try:
                    st = full.stat()
                except FileNotFoundError:  # deleted since the walk saw it
                    continue
                found.append((str(full.relative_to(self.root)), st.st_size, st.st_mtime))
        return sorted(found)

    def put_bytes(self, key: str, data: bytes) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f"{target.name}.{secrets.token_hex(6)}.partial")
        temp.write_bytes(data)
        os.replace(temp, target)

    def presign(self, key: str, expires_in: timedelta) -> str | None:
        return None  # a directory has no URL a client could reach


@dataclass(frozen=True)
class S3Location:
    """``--cache-store s3://bucket/prefix``."""

    bucket: str
    prefix: str


def parse_store_url(text: str) -> S3Location:
    """The bucket and key prefix of ``s3://bucket[/prefix]`` (ValueError otherwise)."""
    parts = urllib.parse.urlsplit(text)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"expected s3://BUCKET[/PREFIX], not {text!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"s3://BUCKET[/PREFIX] takes no query or fragment: {text!r}")
    return S3Location(parts.netloc, parts.path.strip("/"))


def aws_profile(environ: Mapping[str, str], home: Path) -> dict[str, str]:
    """What the shared AWS files say for ``AWS_PROFILE`` (or ``default``), as obstore's
    settings: static keys from ``~/.aws/credentials`` and ``~/.aws/config``
    (``AWS_SHARED_CREDENTIALS_FILE``, ``AWS_CONFIG_FILE``) and the region, each only where the
    environment does not set it. SSO and assumed roles are not read here."""
    profile = environ.get("AWS_PROFILE", "default")
    files = [
        (environ.get("AWS_SHARED_CREDENTIALS_FILE", str(home / ".aws" / "credentials")), profile),
        (
            environ.get("AWS_CONFIG_FILE", str(home / ".aws" / "config")),
            profile if profile == "default" else f"profile {profile}",
        ),
    ]
    wanted = {
        "aws_access_key_id": ("AWS_ACCESS_KEY_ID", "access_key_id"),
        "aws_secret_access_key": ("AWS_SECRET_ACCESS_KEY", "secret_access_key"),
        "aws_session_token": ("AWS_SESSION_TOKEN", "session_token"),
        "region": ("AWS_REGION", "region"),
    }
    found: dict[str, str] = {}
    for filename, section in files:
        parser = configparser.RawConfigParser()
        try:
            parser.read(filename, encoding="utf-8")
        except (OSError, configparser.Error):
            continue
        if not parser.has_section(section):
            continue
        for name, (variable, option) in wanted.items():
            value = parser.get(section, name, fallback=None)
            if value and option not in found and variable not in environ:
                if not (option == "region" and "AWS_DEFAULT_REGION" in environ):
                    found[option] = value.strip()
    return found


class S3Objects:
    """An S3-compatible bucket (obstore's ``S3Store``) as an :class:`ObjectStore`."""

    def __init__(self, location: S3Location, endpoint: str | None = None) -> None:
        try:
            import obstore
            from obstore.exceptions import AlreadyExistsError, NotFoundError
            from obstore.store import S3Store
        except ImportError as exc:
            raise StoreUnusable(f"--cache-store s3:// needs the S3 client: {INSTALL_HINT}") from exc
        self._obstore = obstore
        self._exists = AlreadyExistsError
        self._missing = NotFoundError
        options: dict[str, Any] = {}
        # obstore's ClientConfig: its default 30 s for a whole request would cut a large
        # blob's body; a stalled read is what must end a transfer
        client: Any = {"connect_timeout": "5s", "read_timeout": "30s", "timeout": "1h"}
        # obstore's RetryConfig: its default (10 retries, up to 3 minutes) would hold a miss
        # that long when the store is down; the upstream answers instead
        retry: Any = {"max_retries": 2, "retry_timeout": timedelta(seconds=15)}
        if endpoint is not None:
            options["endpoint"] = endpoint
            options["virtual_hosted_style_request"] = False  # MinIO, Garage, moto: path style
            if endpoint.startswith("http://"):
                client["allow_http"] = True
        # obstore reads the AWS_* variables itself (and instance roles); the profile files it
        # does not, so their values are passed on explicitly (the variables still win)
        options.update(aws_profile(os.environ, Path.home()))
        self._store = S3Store(
            location.bucket,
            prefix=location.prefix or None,
            client_options=client,
            retry_config=retry,
            **options,
        )
        where = f"s3://{location.bucket}/{location.prefix}".rstrip("/")
        self.description = where if endpoint is None else f"{where} at {endpoint}"

    def put_new(self, key: str, path: Path) -> bool:
        try:
            self._obstore.put(self._store, key, path, mode="create")
        except self._exists:
            return False
        return True

    def put(self, key: str, path: Path) -> None:
        self._obstore.put(self._store, key, path)

    def size(self, key: str) -> int | None:
        try:
            meta = self._obstore.head(self._store, key)
        except (self._missing, FileNotFoundError):
            return None
        return int(meta["size"])

    def chunks(self, key: str) -> Iterator[bytes]:
        try:
            result = self._obstore.get(self._store, key)
        except self._missing as exc:
            raise FileNotFoundError(key) from exc
        for chunk in result.stream(min_chunk_size=CHUNK):
            yield bytes(chunk)

    def read_range(self, key: str, start: int, end: int) -> bytes:
        return bytes(self._obstore.get_range(self._store, key, start=start, end=end))

    def get_to(self, key: str, path: Path) -> bool:
        try:
            chunks = self.chunks(key)
            with open(path, "xb") as target:
                for chunk in chunks:
                    target.write(chunk)
        except FileNotFoundError:
            path.unlink(missing_ok=True)
            return False
        return True

    def delete(self, key: str) -> None:
        try:
            self._obstore.delete(self._store, key)
        except (self._missing, FileNotFoundError):
            pass

    def list(self, prefix: str) -> list[tuple[str, int]]:
        found: list[tuple[str, int]] = []
        for batch in self._obstore.list(self._store, prefix=prefix):
            found.extend((str(meta["path"]), int(meta["size"])) for meta in batch)
        return sorted(found)

    def listing(self, prefix: str) -> Listing:
        found: Listing = []
        for batch in self._obstore.list(self._store, prefix=prefix):
            found.extend(
                (str(meta["path"]), int(meta["size"]), meta["last_modified"].timestamp())
                for meta in batch
            )
        return sorted(found)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._obstore.put(self._store, key, data)

    def presign(self, key: str, expires_in: timedelta) -> str | None:
        # signed locally with the store's credentials (SigV4 query parameters): no request
        return str(self._obstore.sign(self._store, "GET", key, expires_in))


def open_object_store(url: str, endpoint: str | None = None) -> ObjectStore:
    """The store ``--cache-store URL`` names (StoreUnusable with what to do if it cannot be)."""
    try:
        location = parse_store_url(url)
    except ValueError as exc:
        raise StoreUnusable(f"--cache-store: {exc}") from None
    return S3Objects(location, endpoint)
