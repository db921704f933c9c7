"""The cache: the content-addressed blob store (``store``), cached manifests and tag state
(``manifests``), and the pull-through driver that applies ``policy.cachepolicy``."""
