"""MIADeepLearning's library: engine (torch side), worker/runner protocol, MRML bridge and CLI, all Qt-free, and
``gui`` (Qt), the Slicer-side code the task modules share, which nothing else in the library imports.

Layers and what each may import are listed in Docs/Developers.md; Testing/Python/test_import_layers.py
enforces them.
"""

from __future__ import annotations

__version__ = "0.1.0"
