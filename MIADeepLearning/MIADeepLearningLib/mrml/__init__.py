"""Slicer MRML bridge: the only place where MIADeepLearning touches MRML nodes.

It turns volume nodes into files for the engine and engine files back into nodes (volumes, segmentations with
names, colours and terminology), records provenance, keeps failed runs from leaving nodes behind, and, for tests
and the demo only, boots a Qt-free Slicer scene (``headless``) and renders it offscreen (``rendering``).
Imports: slicer, vtk, numpy and the stdlib only (never qt, ctk, torch), so it runs inside Slicer and under pytest.
"""
