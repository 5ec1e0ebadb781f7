"""Choosing training data: TAGCOS coresets from gradient features (features.py, projection.py, omp.py,
coreset.py)."""
