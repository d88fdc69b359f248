"""Autoscaling names users import (Ray: ``ray.serve.config.AutoscalingContext`` and
``ray.serve.autoscaling_policy``); the policy itself lives in :mod:`shoal.serving.autoscaling`."""

from __future__ import annotations

from shoal.serving.autoscaling import AutoscalingContext, replica_queue_length_autoscaling_policy

__all__ = ["AutoscalingContext", "replica_queue_length_autoscaling_policy"]
