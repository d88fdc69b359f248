"""The benchmark workloads, one application per module.

Each module's only framework-specific lines are the import switch at its top: with
``BENCH_FRAMEWORK=ray`` it imports Ray Serve, otherwise shoal. Everything below that line is
the same program for both frameworks. ``bare_asgi`` is the exception: a raw ASGI app served by
plain uvicorn, the ceiling any Python HTTP server on this machine can reach.
"""
