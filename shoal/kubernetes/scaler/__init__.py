"""The shoal scaler: one small pod per application that autoscales its deployments on Kubernetes.

It runs shoal's own autoscaler (:class:`shoal.serving.autoscaling.Autoscaler`, the code local
mode runs: default and custom policies, delays, bounds, scale to and from zero) on the load the
pods already report on their admin port's ``/metrics``, and tells KEDA each deployment's desired
replica count through KEDA's ``metrics-api`` trigger. No Prometheus is needed. Callers that hold
requests for a deployment with no pod post demand to it, so that 0 → 1 happens at once.

Parts: :mod:`~shoal.kubernetes.scaler.core` (pure: samples in, desired counts out),
:mod:`~shoal.kubernetes.scaler.scrape` (finding and reading the pods),
:mod:`~shoal.kubernetes.scaler.server` (bounded HTTP), :mod:`~shoal.kubernetes.scaler.service`
(the loop and routes), :mod:`~shoal.kubernetes.scaler.command` (``shoal k8s scaler``) and
:mod:`~shoal.kubernetes.scaler.client` (a bounded HTTP client the scaler, callers and the
simulation share).
"""

from __future__ import annotations
