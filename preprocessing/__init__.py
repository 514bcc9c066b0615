"""Loaders, beamline geometry, orthonormalisation and the preparation pipeline (transport-free)."""
