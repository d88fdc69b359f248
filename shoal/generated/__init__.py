"""Protocol buffers shoal serves (Ray Serve's ``ray.serve.generated``).

``serve_pb2`` holds the messages of the gRPC ingress's built-in ``ray.serve.RayServeAPIService``
(``ListApplications``, ``Healthz``), ``serve_pb2_grpc`` its stub and servicer helpers, with the
names of Ray's generated modules. ``serve.proto`` is their definition.
``health_pb2`` holds those of the standard ``grpc.health.v1.Health`` (``health.proto``), which
:mod:`shoal.runtime.grpc_health` serves.
"""
