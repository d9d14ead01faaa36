"""The CRDs in ``crds/`` are generated from ``aiso.resources`` and must not drift from it.

``aiso crds`` rewrites them; this test (and ``aiso crds --check`` in ``make lint``) fails when
a model changed and the YAML was not regenerated. The other tests check what makes a CRD
acceptable and useful: a structural schema, defaults that agree with Pydantic's, enums and
bounds, printer columns. The e2e tests apply the same files to a real API server.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

import aiso.cli.crds  # noqa: F401  (registers the command)
from aiso.cli.app import app
from aiso.contracts import PayloadType
from aiso.crdgen import check_crds, crd_for, render, write_crds
from aiso.resources import AIService, AIServiceSpec, Pipeline, PipelineSpec

ROOT = Path(__file__).resolve().parent.parent
CRDS = ROOT / "crds"


def _schema(model: type[AIService] | type[Pipeline]) -> dict[str, Any]:
    version = crd_for(model)["spec"]["versions"][0]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def _nodes(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every schema node with its path (``default`` values are data, not schema)."""
    found = [(path, node)]
    for name, child in (node.get("properties") or {}).items():
        found += _nodes(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        found += _nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        found += _nodes(node["additionalProperties"], f"{path}{{}}")
    return found


def _apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """What the API server's structural defaulting does to ``value``."""
    if isinstance(value, dict):
        for name, prop in (schema.get("properties") or {}).items():
            if name not in value and "default" in prop:
                value[name] = copy.deepcopy(prop["default"])
            if name in value:
                value[name] = _apply_defaults(prop, value[name])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_apply_defaults(schema["items"], v) for v in value]
    return value


def test_crds_directory_is_up_to_date() -> None:
    drifted = check_crds(CRDS)
    assert not drifted, (
        f"crds/ is out of date with aiso/resources.py ({', '.join(p.name for p in drifted)}); "
        "run `aiso crds` and commit the result"
    )


def test_check_command_lists_drift_and_exits_1(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(app, ["crds", "--out", str(tmp_path), "--check"])
    assert missing.exit_code == 1
    assert "aiservices.aiso.dev.yaml" in missing.output

    written = runner.invoke(app, ["crds", "--out", str(tmp_path)])
    assert written.exit_code == 0, written.output
    assert runner.invoke(app, ["crds", "--out", str(tmp_path), "--check"]).exit_code == 0

    (tmp_path / "pipelines.aiso.dev.yaml").write_text("# edited by hand\n")
    drift = runner.invoke(app, ["crds", "--out", str(tmp_path), "--check"])
    assert drift.exit_code == 1
    assert "pipelines.aiso.dev.yaml" in drift.output
    assert "aiservices" not in drift.output


def test_written_files_are_plain_yaml_of_the_crds(tmp_path: Path) -> None:
    write_crds(tmp_path)
    for model in (AIService, Pipeline):
        text = render(model)
        assert "&id" not in text and "*id" not in text  # no YAML anchors or aliases
        assert yaml.safe_load(text) == crd_for(model)


@pytest.mark.parametrize(
    ("model", "plural", "short"), [(AIService, "aiservices", "ais"), (Pipeline, "pipelines", "pl")]
)
def test_names_scope_and_status_subresource(model: Any, plural: str, short: str) -> None:
    crd = crd_for(model)
    spec = crd["spec"]
    assert crd["metadata"]["name"] == f"{plural}.aiso.dev"
    assert spec["group"] == "aiso.dev" and spec["scope"] == "Namespaced"
    assert spec["names"]["plural"] == plural and spec["names"]["kind"] == model.__name__
    assert short in spec["names"]["shortNames"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}


@pytest.mark.parametrize("model", [AIService, Pipeline])
def test_schema_is_structural(model: Any) -> None:
    for path, node in _nodes(_schema(model)):
        where = path or "<root>"
        assert "type" in node, f"{where}: every node needs a type"
        for key in ("$ref", "$defs", "anyOf", "oneOf", "allOf", "title", "const"):
            assert key not in node, f"{where}: {key} is not allowed"
        assert node.get("additionalProperties") is not False, f"{where}"
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True and "minimum" in node, where


def test_only_free_form_fields_keep_unknown_fields() -> None:
    free = {
        path
        for model in (AIService, Pipeline)
        for path, node in _nodes(_schema(model))
        if node.get("x-kubernetes-preserve-unknown-fields")
    }
    assert free == {
        ".spec.resources",
        ".spec.env[]",
        ".spec.steps[].parameters",
        ".status.steps[]",
    }


def test_validation_comes_from_the_models() -> None:
    spec = _schema(AIService)["properties"]["spec"]
    props = spec["properties"]
    payload_types = [p.value for p in PayloadType]
    assert set(spec["required"]) == {"handler", "input", "output"}
    assert props["input"]["items"]["enum"] == payload_types
    assert props["input"]["minItems"] == 1
    assert props["output"]["enum"] == payload_types
    assert props["concurrency"] == {
        "description": "Messages one replica runs at once.",
        "type": "integer",
        "default": 4,
        "maximum": 1024,
        "minimum": 1,
    }
    assert props["timeoutSeconds"]["minimum"] == 0 and props["timeoutSeconds"]["exclusiveMinimum"]
    assert props["handler"]["pattern"] == AIServiceSpec.model_fields["handler"].metadata[0].pattern
    assert props["queueDeletionPolicy"]["enum"] == ["DeleteIfEmpty", "Delete", "Retain"]
    scaling = props["scaling"]["properties"]
    assert scaling["minReplicas"]["minimum"] == 0
    assert scaling["targetCPUUtilization"]["nullable"] is True  # null turns the CPU target off
    steps = _schema(Pipeline)["properties"]["spec"]["properties"]["steps"]
    assert steps["minItems"] == 1
    assert steps["items"]["properties"]["service"]["pattern"].startswith("^[a-z]")
    assert steps["items"]["properties"]["fallback"]["properties"]["type"]["enum"] == [
        "skip",
        "service",
    ]


@pytest.mark.parametrize(
    ("model", "spec_model", "minimal"),
    [
        (
            AIService,
            AIServiceSpec,
            {"handler": "aiso.services.normalize:service", "input": ["text"], "output": "text"},
        ),
        (Pipeline, PipelineSpec, {"input": "text", "steps": [{"name": "a", "service": "a"}]}),
    ],
)
def test_api_server_defaults_agree_with_pydantic(
    model: Any, spec_model: Any, minimal: dict[str, Any]
) -> None:
    schema = _schema(model)["properties"]["spec"]
    defaulted = _apply_defaults(schema, copy.deepcopy(minimal))
    expected = spec_model.model_validate(minimal).model_dump(
        mode="json", by_alias=True, exclude_none=True
    )
    assert defaulted == expected
    # And a spec as the API server stores it reads back as the same model.
    assert spec_model.model_validate(defaulted) == spec_model.model_validate(minimal)


def test_status_has_no_defaults_and_conditions_are_a_map() -> None:
    for model in (AIService, Pipeline):
        status = _schema(model)["properties"]["status"]
        assert all("default" not in node for _, node in _nodes(status))
        conditions = status["properties"]["conditions"]
        assert conditions["x-kubernetes-list-type"] == "map"
        assert conditions["x-kubernetes-list-map-keys"] == ["type"]
        fields = conditions["items"]["properties"]
        assert fields["lastTransitionTime"]["format"] == "date-time"
        assert fields["status"]["enum"] == ["True", "False", "Unknown"]


def test_printer_columns() -> None:
    def columns(model: Any) -> dict[str, str]:
        version = crd_for(model)["spec"]["versions"][0]
        return {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}

    assert columns(AIService) == {
        "Ready": '.status.conditions[?(@.type=="Ready")].status',
        "Reason": '.status.conditions[?(@.type=="Ready")].reason',
        "Replicas": ".status.readyReplicas",
        "Queue depth": ".status.queue.messages",
        "Age": ".metadata.creationTimestamp",
    }
    assert set(columns(Pipeline)) == {"Ready", "Reason", "Steps", "Age"}
