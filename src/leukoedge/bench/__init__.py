"""Benchmarks of bundles and of the running app (``leukoedge bench``).

Device side: imports the runtime, never TensorFlow. ``latency`` measures
interleaved bundles, ``app`` loads the HTTP API on loopback, ``machine``
records where a figure came from, ``report`` writes JSON and Markdown.
"""
