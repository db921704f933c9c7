"""nginx configurations (pure string rendering): the origin, the pasted recipe, the tuned recipe.

Every instance lives in its own prefix directory (pid, error log and temp paths inside it),
listens on 127.0.0.1 only, and logs no access lines. The contestants start from Debian's default
``nginx.conf`` (``worker_processes auto``, ``worker_connections 768``, ``sendfile``,
``tcp_nopush``, ``gzip on``) with the recipe in the server block, as users deploy it.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bench.fixtures import MANIFEST_TYPE

Flavour = Literal["recipe", "tuned"]

BLOB_PATH = "/v2/bench/blob/blobs/sha256:"
NOREDIR_BLOB_PATH = "/v2/bench/nocdn/blobs/sha256:"
MANIFEST_PATH = "/v2/bench/blob/manifests/latest"
BIG_MANIFEST_PATH = "/v2/bench/big/manifests/"  # + any tag: the same big manifest
CDN_LOG_FORMAT = "$status $body_bytes_sent $uri"  # render_origin's cdn_log


@dataclass(frozen=True)
class OriginPorts:
    registry_tls: int
    registry_http: int
    cdn_tls: int
    cdn_http: int


def _main_block(prefix: Path, workers: str, connections: int) -> str:
    tmp = prefix / "tmp"
    return f"""\
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections {connections}; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    types_hash_max_size 2048;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
"""


def _listen(port: int, tls: bool) -> str:
    return f"listen 127.0.0.1:{port}{' ssl' if tls else ''};"


def render_origin(
    prefix: Path,
    ports: OriginPorts,
    blob_dir: Path,
    manifest: Path,
    manifest_digest: str,
    cert: Path,
    key: Path,
    workers: str = "auto",
    big_manifest: tuple[Path, str] | None = None,
    big_manifest_dir: Path | None = None,
    cdn_log: Path | None = None,
) -> str:
    """Docker Hub for blobs: a registry (blob GET -> 307 to the CDN with a signed-looking query,
    a no-redirect blob path, the manifest, and ``big_manifest`` (file, digest) under every tag of
    :data:`BIG_MANIFEST_PATH` if given) and a CDN serving the files, each over TLS and plain
    HTTP. Static files come from /dev/shm (sendfile on the plain ports). ``cdn_log``: the CDN's
    requests are logged there, one ``STATUS BODY_BYTES_SENT URI`` line each
    (:data:`CDN_LOG_FORMAT`): the bytes the upstream sent, as a bill would count them."""
    token = secrets.token_urlsafe(24)
    big = ""
    if big_manifest is not None:
        big_path, big_digest = big_manifest
        if big_manifest_dir is not None:  # distinct per "miss-<i>" tag; no digest header
            big += f"""\
        location ~ "^{BIG_MANIFEST_PATH}(?<variant>miss-[0-9]+)$" {{
            alias {big_manifest_dir}/$variant.json;
            types {{ }}
            default_type {MANIFEST_TYPE};
        }}
"""
        big += f"""\
        location ~ "^{BIG_MANIFEST_PATH}[A-Za-z0-9._-]+$" {{
            alias {big_path};
            types {{ }}
            default_type {MANIFEST_TYPE};
            add_header Docker-Content-Digest {big_digest};
        }}
"""

    def registry(port: int, tls: bool, cdn: str) -> str:
        return f"""\
    server {{
        {_listen(port, tls)}
        location = /v2/ {{ default_type application/json; return 200 '{{}}'; }}
        location ~ "^{BLOB_PATH}([0-9a-f]{{64}})$" {{
            return 307 {cdn}/blobs/$1?verify=1700000000-{token}&expires=3600;
        }}
        location ~ "^{NOREDIR_BLOB_PATH}([0-9a-f]{{64}})$" {{
            alias {blob_dir}/$1;
            add_header Docker-Content-Digest sha256:$1;
        }}
        location = {MANIFEST_PATH} {{
            alias {manifest};
            types {{ }}
            default_type {MANIFEST_TYPE};
            add_header Docker-Content-Digest {manifest_digest};
        }}
{big}\
    }}
"""

    cdn_logging = "" if cdn_log is None else f"        access_log {cdn_log} cdnbytes;\n"

    def cdn(port: int, tls: bool) -> str:
        return f"""\
    server {{
        {_listen(port, tls)}
{cdn_logging}\
        location /blobs/ {{ alias {blob_dir}/; }}
    }}
"""

    return (
        _main_block(prefix, workers, 4096)
        + f"""\
    tcp_nodelay on;
    keepalive_requests 100000;
    keepalive_timeout 300s;
    output_buffers 2 256k;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache shared:origin:10m;
"""
        + ("" if cdn_log is None else f"    log_format cdnbytes '{CDN_LOG_FORMAT}';\n")
        + registry(ports.registry_tls, True, f"https://127.0.0.1:{ports.cdn_tls}")
        + registry(ports.registry_http, False, f"http://127.0.0.1:{ports.cdn_http}")
        + cdn(ports.cdn_tls, True)
        + cdn(ports.cdn_http, False)
        + "}\n"
    )


def render_contestant(
    flavour: Flavour,
    prefix: Path,
    listen_port: int,
    tls: bool,
    origin_port: int,
    ca: Path,
    cert: Path,
    key: Path,
    workers: str = "auto",
) -> str:
    """The recipe people paste (``proxy_buffering off``, redirects chased through
    ``@handle_redirect``), or the same tuned: buffering, upstream keep-alive, TLS session cache
    and a 16k TLS record size. Both verify the origin against ``ca`` like hubproxy does."""
    server_tls = (
        f"""\
        ssl_certificate {cert};
        ssl_certificate_key {key};
"""
        if tls
        else ""
    )
    upstream_tls = f"""\
        proxy_ssl_verify on;
        proxy_ssl_trusted_certificate {ca};
        proxy_ssl_name localhost;
"""
    redirect = """\
        location @handle_redirect {
            set $saved_redirect_location '$upstream_http_location';
            proxy_pass $saved_redirect_location;
        }
"""
    if flavour == "recipe":
        upstream_block = ""
        server_tuning = ""
        proxy_target = f"https://127.0.0.1:{origin_port}"
        location_tuning = "            proxy_buffering off;\n"
    else:
        upstream_block = f"""\
    upstream origin_registry {{
        server 127.0.0.1:{origin_port};
        keepalive 32;
        keepalive_requests 10000;
        keepalive_timeout 60s;
    }}
"""
        server_tuning = """\
        keepalive_requests 10000;
        ssl_buffer_size 16k;
        ssl_session_cache shared:tuned:10m;
        ssl_session_timeout 1h;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_ssl_session_reuse on;
        proxy_buffering on;
        proxy_buffer_size 16k;
        proxy_buffers 16 64k;
        proxy_busy_buffers_size 256k;
        proxy_max_temp_file_size 0;
"""
        proxy_target = "https://origin_registry"
        location_tuning = ""
    return (
        _main_block(prefix, workers, 768)
        + """\
    gzip on;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_prefer_server_ciphers on;
"""
        + upstream_block
        + f"""\
    server {{
        {_listen(listen_port, tls)}
{server_tls}{upstream_tls}{server_tuning}\
        location /v2/ {{
            proxy_pass {proxy_target};
            proxy_ssl_server_name on;
{location_tuning}\
            proxy_intercept_errors on;
            recursive_error_pages on;
            error_page 301 302 307 = @handle_redirect;
        }}
{redirect}\
    }}
}}
"""
    )
