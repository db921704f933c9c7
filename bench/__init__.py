"""Blob-throughput benchmark: hubproxy against the nginx recipe it replaces, on 127.0.0.1.

``python -m bench`` starts a Docker-Hub-like origin (registry answering blob GETs with a 307 to a
separate CDN endpoint, both TLS, nginx serving from /dev/shm), puts each contestant in front of
it (hubproxy, the pasted nginx recipe, a tuned nginx, and the client fetching directly), runs
every case interleaved over several repetitions with a discarded warm-up, verifies the sha256
of every byte received, and writes ``results.md``, ``results.json`` and ``throughput.png``.

Modules, one concern each:

- :mod:`bench.cases`       case names -> what to fetch (pure)
- :mod:`bench.fixtures`    certificates, blob files and the manifest on /dev/shm
- :mod:`bench.nginxconf`   nginx configurations: origin, recipe, tuned (pure)
- :mod:`bench.procs`       starting/stopping processes, /proc CPU and peak-RSS readings
- :mod:`bench.origin`      the origin nginx instance
- :mod:`bench.contestants` hubproxy and nginx contestants, and the direct "ceiling"
- :mod:`bench.clients`     curl for blobs, wrk for small requests, output parsing (pure parts)
- :mod:`bench.stats`       median/min/max and ratios (pure)
- :mod:`bench.runner`      the interleaved repetition loop
- :mod:`bench.report`      Markdown, JSON, PNG and the summary lines
- :mod:`bench.env`         required tools (installing them as root) and the machine description
- :mod:`bench.cli`         the command line
"""
