"""The torch side of MIADeepLearning: model packages, devices, image I/O, input checks and task pipelines.

Never imports slicer, vtk or qt. `errors` and `registry` import neither torch nor SimpleITK at module level.
"""

from __future__ import annotations
