"""`shoal graph`: Mermaid and DOT text from AppSpecs, config-file overrides, Graphviz rendering."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from shoal.cli.main import cli
from shoal.deployment import build_app_spec
from shoal.graph import (
    GraphvizNotFoundError,
    describe,
    load_app_specs,
    render,
    render_graphviz,
    to_dot,
    to_mermaid,
)
from tests.unit.fixtures import graph_apps

REPO = Path(__file__).resolve().parents[2]
APPS = "tests.unit.fixtures.graph_apps"
HAS_DOT = shutil.which("dot") is not None


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "path", list(sys.path))


def test_describe_shows_replicas_resources_and_ingress() -> None:
    spec = build_app_spec(graph_apps.app, "shop", "/shop")
    nodes = {n.name: n for n in describe(spec)}
    assert next(iter(nodes)) == "Api"
    assert nodes["Api"].lines() == ["ingress · route /shop", "replicas: 1", "cpu 0.5", "max_ongoing_requests: 10"]
    assert nodes["Preprocess"].lines() == [
        "replicas: 0-4 auto, target 3/replica", "cpu 1", "max_ongoing_requests: 5"]
    assert nodes["Model"].replicas == "replicas: 2"
    assert nodes["Model"].resources == "cpu 1 · gpu 0.5 · mem 2 GiB · tpu 1"
    no_route = describe(build_app_spec(graph_apps.app, "internal", None))[0]
    assert no_route.lines()[0] == "ingress · no HTTP route"
    auto = describe(build_app_spec(graph_apps.Model.options(num_replicas="auto").bind(), "a"))[0]
    assert auto.replicas == "replicas: 1-100 auto, target 2/replica"


def test_mermaid() -> None:
    text = to_mermaid(build_app_spec(graph_apps.app, "shop", "/shop"))
    assert text.splitlines() == [
        "flowchart LR",
        '  subgraph app__shop["application shop"]',
        '    dep__shop__Api["<b>Api</b><br/>ingress · route /shop<br/>replicas: 1<br/>cpu 0.5<br/>'
        'max_ongoing_requests: 10"]',
        '    dep__shop__Preprocess["<b>Preprocess</b><br/>replicas: 0-4 auto, target 3/replica<br/>cpu 1<br/>'
        'max_ongoing_requests: 5"]',
        '    dep__shop__Model["<b>Model</b><br/>replicas: 2<br/>cpu 1 · gpu 0.5 · mem 2 GiB · tpu 1<br/>'
        'max_ongoing_requests: 5"]',
        "  end",
        '  http__shop(["HTTP /shop"])',
        "  http__shop --> dep__shop__Api",
        "  dep__shop__Api --> dep__shop__Preprocess",
        "  dep__shop__Api --> dep__shop__Model",
        "  classDef ingress fill:#fdf1dc,stroke:#c77d00",
        "  class dep__shop__Api ingress",
    ]


def test_dot_and_several_apps_with_quoting() -> None:
    specs = [build_app_spec(graph_apps.app, "shop", "/"), build_app_spec(graph_apps.odd, "odd app", None)]
    text = to_dot(specs)
    assert text.startswith("digraph shoal {\n  rankdir=LR;")
    assert "subgraph cluster__shop {" in text and 'label="application odd app";' in text
    assert "dep__shop__Api -> dep__shop__Model;" in text and "http__shop -> dep__shop__Api;" in text
    assert "http__odd_app" not in text  # no route, no HTTP entry
    assert "<b>odd &quot;name&quot;</b>" in text  # HTML label, escaped
    assert text.count("{") == text.count("}")
    mermaid = to_mermaid(specs)
    assert "odd #quot;name#quot;" in mermaid and "class dep__shop__Api,dep__odd_app__odd__name_ ingress" in mermaid


def test_load_app_specs_from_import_paths_and_builders() -> None:
    [spec] = load_app_specs(f"{APPS}:app", name="shop", route_prefix="/s")
    assert (spec.name, spec.route_prefix, spec.ingress) == ("shop", "/s", "Api")
    assert sorted(spec.edges()) == [("Api", "Model"), ("Api", "Preprocess")]
    [built] = load_app_specs(f"{APPS}:build")
    assert built.deployments["Model"].config.num_replicas == 1
    [none] = load_app_specs(f"{APPS}:app", route_prefix="none")
    assert none.route_prefix is None


def test_config_file_overrides_are_drawn(tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text(f"""
applications:
  - name: shop
    route_prefix: /shop
    import_path: {APPS}:app
    deployments:
      - name: Model
        num_replicas: 7
        ray_actor_options: {{num_cpus: 2}}
  - name: sized
    route_prefix: /sized
    import_path: {APPS}:build
    args: {{replicas: 3}}
""")
    shop, sized = load_app_specs(str(config))
    model = {n.name: n for n in describe(shop)}["Model"]
    assert model.replicas == "replicas: 7" and model.resources == "cpu 2"
    assert sized.deployments["Model"].config.num_replicas == 3
    text = to_mermaid([shop, sized])
    assert "replicas: 7" in text and "replicas: 3" in text


def test_missing_graphviz_names_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(GraphvizNotFoundError, match="apt-get install graphviz"):
        render_graphviz("digraph {}", "svg", dot=str(tmp_path / "no-dot"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(GraphvizNotFoundError, match="apt-get install graphviz"):
        render([build_app_spec(graph_apps.odd, "x")], "png")
    result = CliRunner().invoke(cli, ["graph", f"{APPS}:app", "-o", str(tmp_path / "g.svg")])
    assert result.exit_code == 1 and "apt-get install graphviz" in result.output
    with pytest.raises(ValueError, match="unknown graph format"):
        render([], "gif")


def test_cli_prints_mermaid_and_infers_the_format_from_the_file(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["graph", f"{APPS}:app"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("flowchart LR\n") and "dep__default__Api --> dep__default__Model" in result.output
    out = tmp_path / "g.dot"
    result = runner.invoke(cli, ["graph", f"{APPS}:app", "-o", str(out)])
    assert result.exit_code == 0 and out.read_text().startswith("digraph shoal {")
    bad = runner.invoke(cli, ["graph", f"{APPS}:nothing"])
    assert bad.exit_code == 1 and "has no attribute 'nothing'" in bad.output
    bad = runner.invoke(cli, ["graph", str(tmp_path / "missing.yaml")])
    assert bad.exit_code == 1 and "no such file" in bad.output


@pytest.mark.skipif(not HAS_DOT, reason="Graphviz's dot is not installed")
def test_svg_and_png_through_dot(tmp_path: Path) -> None:
    svg = render(load_app_specs(f"{APPS}:app"), "svg")
    assert b"<svg" in svg and b"Preprocess" in svg
    result = CliRunner().invoke(cli, ["graph", f"{APPS}:app", "--format", "png", "-o", str(tmp_path / "g.img")])
    assert result.exit_code == 0
    assert (tmp_path / "g.img").read_bytes().startswith(b"\x89PNG")
