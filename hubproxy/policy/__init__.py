"""The decisions: who may use the mirror, where a request goes, whose credentials go with it,
which redirects and upstreams to follow, when the cache may answer. Plain functions over bytes,
header lists and frozen dataclasses; nothing here imports trio, a socket, the clock, the file
system or the configuration, nor anything outside this folder (``tests/test_layering.py``)."""
