"""Data shipped with the package: ``demo_examples.npz``, the example patterns ``defectscope demo`` classifies.

Simulated once (2 per class, seed 2021) with ``python -m defectscope.server.demo --write-examples``;
plain arrays, read with ``numpy.load(..., allow_pickle=False)`` by ``defectscope.server.demo.load_examples``.
"""
