"""Throughput benchmark: hubproxy against the nginx recipe it replaces, on 127.0.0.1.

``python -m bench`` starts a Docker-Hub-like origin (registry answering blob GETs with a 307 to a
separate CDN endpoint, both TLS, nginx serving from /dev/shm), puts each contestant in front of
it (hubproxy passing, missing its cache and hitting it; the tuned nginx recipe, the baseline of
every ratio; the pasted recipe; and the client fetching directly), runs issue 14's cases (1 GiB,
64 MiB and 100 x 1 MiB; 1 KiB requests with wrk; 1 GiB with the proxy on one core) interleaved
over several repetitions with a discarded warm-up, verifies the sha256 of every byte received,
writes ``results.md``, ``results.json`` and ``throughput.png``, and prints the issue's targets,
each with pass or FAIL.

Modules, one concern each:

- :mod:`bench.cases`       case names -> what to fetch (pure)
- :mod:`bench.fixtures`    certificates, blob files and the manifest on /dev/shm
- :mod:`bench.nginxconf`   nginx configurations: origin, recipe, tuned (pure)
- :mod:`bench.procs`       starting/stopping processes, /proc CPU and peak-RSS readings
- :mod:`bench.origin`      the origin nginx instance
- :mod:`bench.contestants` hubproxy (pass, miss, hit) and nginx contestants, the direct "ceiling"
- :mod:`bench.clients`     curl for blobs, wrk for small requests, output parsing (pure parts)
- :mod:`bench.stats`       median/min/max and ratios (pure)
- :mod:`bench.results`     run records, per-case summaries, every ratio (pure)
- :mod:`bench.targets`     issue 14's targets checked, and the summary lines (pure)
- :mod:`bench.runner`      the interleaved repetition loop
- :mod:`bench.report`      Markdown, JSON, PNG and the summary lines
- :mod:`bench.env`         required tools (installing them as root) and the machine description
- :mod:`bench.cli`         the command line
"""
