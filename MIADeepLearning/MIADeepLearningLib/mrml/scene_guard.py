"""Roll back the scene when a run fails, so a failed or cancelled Apply leaves the scene as it found it."""

from __future__ import annotations

from types import TracebackType

import slicer


class SceneGuard:
    """Context manager: on an exception, remove every node added inside the block (newest first) and re-raise.

    A normal exit, or an earlier ``commit()``, keeps the added nodes. Nodes that existed before the block are
    never touched, even if the block modified them.
    """

    def __init__(self, scene: slicer.vtkMRMLScene | None = None) -> None:
        self.scene = scene if scene is not None else slicer.mrmlScene
        self._ids_before: set[str] = set()
        self._committed = False

    def __enter__(self) -> SceneGuard:
        self._ids_before = set(self._node_ids())
        self._committed = False
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc_type is not None and not self._committed:
            self.rollback()
        return False  # never swallow the exception

    def commit(self) -> None:
        """Keep the nodes added so far, whatever happens later in the block."""
        self._committed = True

    def added_node_ids(self) -> list[str]:
        """IDs of the nodes added since entering, in the order they were added."""
        return [node_id for node_id in self._node_ids() if node_id not in self._ids_before]

    def rollback(self) -> None:
        """Remove the added nodes, newest first (removing one may already have removed its display nodes).

        Scene infrastructure created on the way (the subject hierarchy node, singletons such as parameter nodes)
        stays: removing the hierarchy node would drop every item in the Data module, not only the run's.
        """
        for node_id in reversed(self.added_node_ids()):
            node = self.scene.GetNodeByID(node_id)
            if node is None or node.GetSingletonTag() or node.IsA("vtkMRMLSubjectHierarchyNode"):
                continue
            self.scene.RemoveNode(node)

    def _node_ids(self) -> list[str]:
        return [self.scene.GetNthNode(i).GetID() for i in range(self.scene.GetNumberOfNodes())]
