from __future__ import annotations

import pytest

import shoal.handle
import shoal.serve
from shoal import serve
from shoal.config import AutoscalingConfig, DeploymentConfig, HTTPOptions


def test_serve_exports_exactly() -> None:
    assert sorted(shoal.serve.__all__) == shoal.serve.__all__
    assert set(shoal.serve.__all__) == {
        "Application", "AutoscalingConfig", "BackPressureError", "Deployment", "DeploymentHandle",
        "DeploymentResponse", "DeploymentResponseGenerator", "DeploymentUnavailableError", "HTTPOptions",
        "RayServeException", "RequestCancelledError", "batch", "delete", "deployment", "get_app_handle",
        "get_deployment_handle", "get_multiplexed_model_id", "get_replica_context", "http_address", "ingress",
        "multiplexed", "run", "shutdown", "shutdown_async", "start",
        "status",
    }
    for name in shoal.serve.__all__:
        assert getattr(serve, name) is not None
    assert set(shoal.handle.__all__) == {"DeploymentHandle", "DeploymentResponse", "DeploymentResponseGenerator"}


def test_ray_serve_defaults() -> None:
    c = DeploymentConfig()
    assert c.num_replicas is None and c.initial_target() == 1
    assert c.max_ongoing_requests == 5
    assert c.max_queued_requests == -1
    assert c.health_check_period_s == 10 and c.health_check_timeout_s == 30
    assert c.graceful_shutdown_wait_loop_s == 2 and c.graceful_shutdown_timeout_s == 20
    assert c.ray_actor_options.effective_num_cpus == 1.0
    a = AutoscalingConfig()
    assert (a.min_replicas, a.max_replicas, a.target_ongoing_requests) == (1, 1, 2.0)
    assert (a.upscale_delay_s, a.downscale_delay_s, a.metrics_interval_s, a.look_back_period_s) == (30, 600, 10, 30)
    h = HTTPOptions()
    assert (h.host, h.port) == ("127.0.0.1", 8000)


def test_decorator_forms_and_options() -> None:
    @serve.deployment
    class A:
        pass

    @serve.deployment(name="Bee", num_replicas=3, ray_actor_options={"num_cpus": 0.5, "num_gpus": 0.25})
    class B:
        pass

    @serve.deployment()
    def f() -> None:
        pass

    assert A.name == "A" and A.num_replicas is None
    assert B.name == "Bee" and B.num_replicas == 3
    assert B.ray_actor_options == {"num_cpus": 0.5, "num_gpus": 0.25}
    assert f.name == "f" and f.is_function
    b2 = B.options(num_replicas="auto")
    auto = b2.config.resolved_autoscaling()
    assert auto is not None and auto.max_replicas == 100
    assert B.num_replicas == 3  # options() copies
    b3 = B.options(autoscaling_config={"min_replicas": 0, "max_replicas": 4})
    assert b3.num_replicas is None and b3.config.initial_target() == 0


def test_invalid_options() -> None:
    with pytest.raises(ValueError, match="num_gpus above 1 must be a whole number"):
        serve.deployment(ray_actor_options={"num_gpus": 1.5})(lambda: None)
    with pytest.raises(ValueError, match="min_replicas must be less than or equal to max_replicas"):
        serve.deployment(autoscaling_config={"min_replicas": 3, "max_replicas": 2})(lambda: None)
    with pytest.raises(ValueError, match="num_replicas and autoscaling_config"):
        serve.deployment(num_replicas=2, autoscaling_config={"max_replicas": 2})(lambda: None)
    with pytest.raises(ValueError, match="max_queued_requests"):
        serve.deployment(max_queued_requests=0)(lambda: None)


def test_deployment_cannot_be_called_directly() -> None:
    @serve.deployment
    class A:
        pass

    with pytest.raises(RuntimeError, match=r"A\.bind"):
        A()


def test_graph_build() -> None:
    from shoal.deployment import build_app_spec

    @serve.deployment
    class Leaf:
        pass

    @serve.deployment
    class Mid:
        def __init__(self, leaf: object) -> None:
            pass

    @serve.deployment
    class Top:
        def __init__(self, a: object, b: object, more: dict[str, object]) -> None:
            pass

    leaf = Leaf.bind()
    spec = build_app_spec(Top.bind(Mid.bind(leaf), leaf, {"x": [leaf]}), "app", "/x")
    assert spec.ingress == "Top" and spec.route_prefix == "/x"
    assert set(spec.deployments) == {"Top", "Mid", "Leaf"}
    assert sorted(spec.edges()) == [("Mid", "Leaf"), ("Top", "Leaf"), ("Top", "Mid")]
    top = spec.deployments["Top"]
    handle = top.init_kwargs.get("more", top.init_args[2])["x"][0]
    assert isinstance(handle, serve.DeploymentHandle) and handle.deployment_name == "Leaf"
    # Two bindings of one deployment are two deployments, the second named Leaf_1 (as in Ray).
    twice = build_app_spec(Mid.bind(Top.bind(Leaf.bind(), Leaf.bind(), {})), "app")
    assert set(twice.deployments) == {"Mid", "Top", "Leaf", "Leaf_1"}
    with pytest.raises(TypeError, match="bind"):
        build_app_spec(Leaf, "app")  # type: ignore[arg-type]


def test_policy_forms() -> None:
    from shoal.config import AutoscalingPolicy

    as_dict = AutoscalingConfig(policy={"policy_function": "mod:fn", "policy_kwargs": {"k": 1}})
    assert as_dict.policy == AutoscalingPolicy(policy_function="mod:fn", policy_kwargs={"k": 1})
    assert AutoscalingConfig(policy="mod:fn").policy == AutoscalingPolicy(policy_function="mod:fn")
    assert AutoscalingConfig(policy=len).policy == AutoscalingPolicy(policy_function=len)
    with pytest.raises(ValueError, match="policy_extra"):
        AutoscalingConfig(policy={"policy_function": "mod:fn", "policy_extra": {}})
    with pytest.raises(ValueError, match="empty string"):
        AutoscalingPolicy(policy_function=" ")


def test_importing_serve_makes_starlette_requests_reachable() -> None:
    # Ray's docs annotate handlers with starlette.requests.Request after a bare `import starlette`.
    import subprocess
    import sys

    code = "import starlette\nfrom shoal import serve\nprint(starlette.requests.Request.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "Request", out.stderr


def test_rays_private_handle_options_are_accepted() -> None:
    handle = serve.DeploymentHandle("D", "app")
    copy = handle.options(_by_reference=False, _prefer_local_routing=True, method_name="m")
    assert copy is not handle
    with pytest.raises(TypeError, match="unsupported handle option"):
        handle.options(no_such_option=1)


def test_status_models_are_importable_where_ray_has_them() -> None:
    from shoal import schema, status

    for name in ("ServeStatus", "ApplicationStatusOverview", "DeploymentStatusOverview", "ApplicationStatus",
                 "DeploymentStatus", "ReplicaState", "ProxyStatus"):
        assert getattr(schema, name) is getattr(status, name)
    assert schema.LoggingConfig is not None


def test_proxy_location_and_encoding_type_enums() -> None:
    from shoal.config import EncodingType, LoggingConfig, ProxyLocation
    from shoal.schema import EncodingType as SchemaEncodingType
    from shoal.schema import ServeDeploySchema

    assert [p.value for p in ProxyLocation] == ["Disabled", "HeadOnly", "EveryNode"]
    assert SchemaEncodingType is EncodingType and [e.value for e in EncodingType] == ["TEXT", "JSON"]
    assert LoggingConfig(encoding=EncodingType.JSON).encoding == "JSON"
    cfg = ServeDeploySchema.model_validate({"proxy_location": ProxyLocation.HeadOnly,
                                            "applications": [{"import_path": "mod:app"}]})
    assert cfg.proxy_location == "HeadOnly"
    with pytest.raises(ValueError, match="proxy_location"):
        ServeDeploySchema.model_validate({"proxy_location": "Everywhere", "applications": [{"import_path": "mod:app"}]})
