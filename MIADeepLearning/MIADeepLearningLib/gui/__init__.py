"""Slicer-side (Qt) code shared by the task modules (DLSegmentation, DLSynthesis, DLRegistration, DLClassification,
DLLesionDetection).

Why a library package: a task module must not import another task module (Slicer would have to load it first, and
copies of the Apply/poll/cancel code drift apart). Each module file keeps only what is its own (its .ui, parameter
node class, Logic signature and result display) and takes the rest from here:

- ``dependencies``: the installer Apply runs before a run (PyTorch through the PyTorch extension, the extension's
  requirements, the model's packages) and the PythonSlicer lookup. Never called from ``setup()``.
- ``task_widget``: ``TaskWidgetMixin`` (Apply <-> Cancel, QTimer polling of the background run, progress, log,
  finish and error reporting, parameter node and model combo box) and ``describeModel``, ``DEVICE_CHOICES``.
- ``task_logic``: ``TaskLogicMixin``, the process-per-run and warm-worker task logics of a module's Logic.

Imports qt, ctk, slicer, vtk and the torch-free parts of the library only; nothing else in the library imports this
package (Testing/Python/test_import_layers.py). Importing it does nothing but import those: no widget, timer or
scene access happens before a module's ``setup()``.
"""

from __future__ import annotations
