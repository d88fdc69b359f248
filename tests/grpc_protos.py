"""A test's .proto compiled with grpcio-tools at test time, importable while the test runs."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def compiled(folder: Path, module: str, proto: str, *also: Path) -> Iterator[Path]:
    """Write ``proto`` as ``folder/module.proto``, generate ``module_pb2`` and ``module_pb2_grpc``
    there, and keep ``folder`` (and ``also``) first on ``sys.path`` until the block ends."""
    from grpc_tools import protoc

    source = folder / f"{module}.proto"
    source.write_text(proto)
    code = protoc.main(["grpc_tools.protoc", f"-I{folder}", f"--python_out={folder}", f"--grpc_python_out={folder}",
                        str(source)])
    assert code == 0, f"grpc_tools.protoc failed ({code}) on {source}"
    added = [str(folder), *(str(p) for p in also)]
    for path in added:
        sys.path.insert(0, path)
    try:
        yield folder
    finally:
        for path in added:
            sys.path.remove(path)
