"""The ``shoal`` command line. ``shoal.cli.main:main`` is the console script; the commands are
grouped by what they do: ``main`` (run, build, graph, status, shutdown, delete), ``lifecycle``
(start, deploy, promote, rollback), ``logs``, and ``common`` (finding and calling an instance).
"""
