"""Provenance of every output node: which model, version, device and input made it.

Stored as a node attribute (compact JSON) because attributes are saved with the scene (.mrml/.mrb) and are
visible in Slicer's Data module, so a result keeps its origin wherever the scene goes.
"""

from __future__ import annotations

import json
from typing import Any

import slicer

PROVENANCE_ATTRIBUTE = "MIADeepLearning.Provenance"


def set_provenance(node: slicer.vtkMRMLNode, data: dict[str, Any]) -> None:
    """Store ``data`` (JSON-serialisable; other values are written as their str()) on the node."""
    text = json.dumps(data, separators=(",", ":"), sort_keys=True, default=str)
    node.SetAttribute(PROVENANCE_ATTRIBUTE, text)


def get_provenance(node: slicer.vtkMRMLNode) -> dict[str, Any] | None:
    """The stored provenance, or None when the node has none (or someone edited it into invalid JSON)."""
    text = node.GetAttribute(PROVENANCE_ATTRIBUTE)
    if not text:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
