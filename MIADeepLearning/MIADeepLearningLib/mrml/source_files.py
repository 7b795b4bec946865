"""Check the file a volume was loaded from before a run: the worker only ever sees a fresh NRRD exported from the
node, so a cut-short ``.nii.gz`` that Slicer loaded as a partly blank volume would otherwise be segmented as is.

Only a node whose voxels are still what its storage node read is checked (not modified since read, file still
there); a volume the user edited, or one that never came from a file, is the user's data and is not refused
because of a file. Verdicts are kept per (path, size, modification time), so a second Apply does not decompress
the same file again.
"""

from __future__ import annotations

from pathlib import Path

import slicer

from MIADeepLearningLib.engine.errors import InputError
from MIADeepLearningLib.engine.filecheck import FileVerdict, examine_image_file

_verdicts: dict[tuple[str, int, int], FileVerdict] = {}


def source_file(node: slicer.vtkMRMLNode | None) -> Path | None:
    """The file the node's data was read from while the node still holds exactly that data; else None."""
    if node is None or not node.IsA("vtkMRMLStorableNode"):
        return None
    storage = node.GetStorageNode()
    if storage is None or node.GetModifiedSinceRead():
        return None
    file_name = storage.GetFileName()
    if not file_name:
        return None
    path = Path(file_name)
    return path if path.is_file() else None


def cached_verdict(path: Path) -> FileVerdict:
    """examine_image_file(path), computed once per version of the file (a changed size or time checks it again).

    Only the header file's size and time are in the key: a detached .nhdr/.mhd data file replaced on its own
    after a first check is not noticed, which is fine for a file the node was read from before either check.
    """
    status = path.stat()
    key = (str(path.resolve()), status.st_size, status.st_mtime_ns)
    verdict = _verdicts.get(key)
    if verdict is None:
        verdict = _verdicts[key] = examine_image_file(path)
    return verdict


def verify_source_file(node: slicer.vtkMRMLNode | None, role: str = "input") -> None:
    """InputError (one sentence naming the volume and its file) when the file the volume was loaded from is
    damaged or cut short; nothing for a volume that does not come unchanged from a file this check can read."""
    path = source_file(node)
    if path is None:
        return
    verdict = cached_verdict(path)
    if verdict.problem:
        raise InputError(f"The file {path.name} of the {role} volume '{node.GetName()}' {verdict.problem}.")
