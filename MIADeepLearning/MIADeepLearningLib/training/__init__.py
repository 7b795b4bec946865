"""Synthetic-data generators and training entry points of the models this project trains (torch; no Slicer)."""
