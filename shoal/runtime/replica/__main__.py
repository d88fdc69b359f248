"""``python -m shoal.runtime.replica``: how the controller starts a replica process."""

from __future__ import annotations

from shoal.runtime.replica.process import main

main()
