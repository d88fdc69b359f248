"""Kubernetes placement: compile apps into plain objects, and run replicas as pods."""
