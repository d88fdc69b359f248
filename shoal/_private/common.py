"""``ray.serve._private.common``'s names that Ray's documentation uses: :class:`DeploymentID`
(the keys of an application-level autoscaling policy's contexts) and :class:`ReplicaID`."""

from __future__ import annotations

from shoal.config import DeploymentID
from shoal.context import ReplicaID

__all__ = ["DeploymentID", "ReplicaID"]
