"""CustomResourceDefinitions generated from the Pydantic models in ``aiso.resources``.

The models are the one source of truth, so the CRDs in ``crds/`` are never edited by hand:
``aiso crds`` writes them and ``aiso crds --check`` (run by ``make lint`` and a unit test)
fails when they drift. The Pydantic JSON schema is close to what Kubernetes wants, but a CRD
needs a *structural* OpenAPI v3 schema, so this module rewrites it:

* ``$ref``/``$defs`` are inlined and ``title`` is dropped;
* ``Optional[X]`` (``anyOf: [X, null]``) becomes ``X`` with ``nullable: true``: structural
  schemas forbid types inside ``anyOf``, and a null must stay null (it means "off", as for
  ``targetCPUUtilization``) rather than being replaced by the default;
* JSON-Schema-2020 ``exclusiveMinimum: n`` becomes OpenAPI 3.0 ``minimum: n`` +
  ``exclusiveMinimum: true``, and ``const`` becomes a one-value ``enum``;
* ``additionalProperties: false`` is dropped (the API server prunes and, with ``kubectl``'s
  strict field validation, rejects unknown fields anyway) and free-form objects
  (``additionalProperties: true``: ``resources``, ``env`` items, ``parameters``) get
  ``x-kubernetes-preserve-unknown-fields``;
* defaults made by ``default_factory`` are evaluated, so the API server fills in ``retry``,
  ``scaling``… exactly as Pydantic would; status has no defaults (only the operator writes it);
* ``conditions`` lists are maps keyed by ``type``, as Kubernetes conventions ask.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import core_schema

from aiso.resources import (
    GROUP,
    VERSION,
    AIService,
    AIServiceSpec,
    AIServiceStatus,
    Pipeline,
    PipelineSpec,
    PipelineStatus,
)

__all__ = ["CRD_MODELS", "CrdInfo", "check_crds", "crd_for", "crd_schema", "render", "write_crds"]


@dataclass(frozen=True)
class CrdInfo:
    """What a CRD needs beyond the schema: names and printer columns."""

    kind: str
    plural: str
    short_names: tuple[str, ...]
    spec: type[BaseModel]
    status: type[BaseModel]
    columns: tuple[dict[str, Any], ...]
    description: str


def _ready_columns() -> tuple[dict[str, Any], ...]:
    return (
        {
            "name": "Ready",
            "type": "string",
            "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
        },
        {
            "name": "Reason",
            "type": "string",
            "priority": 1,
            "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
        },
    )


_AGE = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}

CRD_MODELS: dict[type[BaseModel], CrdInfo] = {
    AIService: CrdInfo(
        kind="AIService",
        plural="aiservices",
        short_names=("ais",),
        spec=AIServiceSpec,
        status=AIServiceStatus,
        columns=(
            *_ready_columns(),
            {
                "name": "Replicas",
                "type": "integer",
                "description": "Ready replicas.",
                "jsonPath": ".status.readyReplicas",
            },
            {
                "name": "Queue depth",
                "type": "integer",
                "description": "Ready messages in the service's queue.",
                "jsonPath": ".status.queue.messages",
            },
            _AGE,
        ),
        description="An AI service: a handler run by autoscaled replicas that consume its queue.",
    ),
    Pipeline: CrdInfo(
        kind="Pipeline",
        plural="pipelines",
        short_names=("pl",),
        spec=PipelineSpec,
        status=PipelineStatus,
        columns=(
            *_ready_columns(),
            # A printer column shows only the first match of a JSONPath, so a list of step
            # names cannot be a column; the Ready message is the chain ("a → b (text → text)")
            # when the pipeline resolves, and what is wrong when it does not.
            {
                "name": "Steps",
                "type": "string",
                "description": "The steps in order when Ready; else why not.",
                "jsonPath": '.status.conditions[?(@.type=="Ready")].message',
            },
            _AGE,
        ),
        description="A chain (or tree) of steps, each run by an AIService.",
    ),
}
"""Every custom resource kind, keyed by its model."""


class _WithFactoryDefaults(GenerateJsonSchema):
    """Also emits defaults made by ``default_factory`` (Pydantic leaves those out)."""

    def get_default_value(self, schema: core_schema.WithDefaultSchema) -> Any:
        factory = schema.get("default_factory")
        if factory is not None and not schema.get("default_factory_takes_data"):
            return factory()  # type: ignore[call-arg]
        return super().get_default_value(schema)


def _structural(node: Any, defs: dict[str, Any], *, defaults: bool) -> Any:
    """One JSON-schema node rewritten as a structural OpenAPI v3 node (see module docs)."""
    if isinstance(node, list):
        return [_structural(item, defs, defaults=defaults) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    ref = node.pop("$ref", None)
    if ref is not None:
        target = defs[ref.rsplit("/", 1)[-1]]
        return _structural({**target, **node}, defs, defaults=defaults)  # the field's own win
    branches = node.pop("anyOf", None)
    if branches is not None:
        kept = [b for b in branches if b.get("type") != "null"]
        if len(kept) != 1 or len(kept) == len(branches):
            raise ValueError(f"cannot make a structural schema of anyOf {branches!r}")
        if node.get("default", ...) is None:
            del node["default"]
        return _structural({**kept[0], **node, "nullable": True}, defs, defaults=defaults)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("title", "$defs") or (key == "default" and not defaults):
            continue
        if key == "additionalProperties":
            if value is True or value == {}:
                out["x-kubernetes-preserve-unknown-fields"] = True
            elif isinstance(value, dict):
                out[key] = _structural(value, defs, defaults=defaults)
            continue
        if key == "exclusiveMinimum":
            out["minimum"] = value
            out["exclusiveMinimum"] = True
        elif key == "exclusiveMaximum":
            out["maximum"] = value
            out["exclusiveMaximum"] = True
        elif key == "const":
            out["enum"] = [value]
        elif key == "properties":
            out[key] = {
                name: _structural(prop, defs, defaults=defaults) for name, prop in value.items()
            }
        elif key == "items":
            out[key] = _structural(value, defs, defaults=defaults)
        elif key == "default":
            out[key] = _without_nulls(value)
        else:
            out[key] = value
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    conditions = out.get("properties", {}).get("conditions")
    if conditions is not None and conditions.get("type") == "array":
        conditions["x-kubernetes-list-type"] = "map"
        conditions["x-kubernetes-list-map-keys"] = ["type"]
    return _ordered(out)


def _without_nulls(value: Any) -> Any:
    """A default as the API server should store it: unset optional fields are left out."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


_KEY_ORDER = ("description", "type", "nullable", "format", "enum", "default", "pattern")


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    """A stable, readable key order: description and type first, then the rest sorted."""
    first = [k for k in _KEY_ORDER if k in node]
    rest = sorted(k for k in node if k not in _KEY_ORDER)
    return {k: node[k] for k in (*first, *rest)}


def _model_schema(model: type[BaseModel], *, defaults: bool) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, schema_generator=_WithFactoryDefaults)
    defs = raw.pop("$defs", {})
    result: dict[str, Any] = _structural(raw, defs, defaults=defaults)
    return result


def crd_schema(info: CrdInfo) -> dict[str, Any]:
    """The ``openAPIV3Schema`` of one kind: spec with defaults, status without."""
    return {
        "description": info.description,
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": _model_schema(info.spec, defaults=True),
            "status": _model_schema(info.status, defaults=False),
        },
    }


def crd_for(model: type[BaseModel]) -> dict[str, Any]:
    """The CustomResourceDefinition of ``model`` (``AIService`` or ``Pipeline``); pure."""
    info = CRD_MODELS[model]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{info.plural}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "aiso"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": info.kind,
                "listKind": f"{info.kind}List",
                "plural": info.plural,
                "singular": info.kind.lower(),
                "shortNames": list(info.short_names),
                "categories": ["aiso"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": crd_schema(info)},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": list(info.columns),
                }
            ],
        },
    }


_HEADER = "# Generated by `aiso crds` from aiso/resources.py; do not edit.\n"


class _Dumper(yaml.SafeDumper):
    """Plain YAML: the enum shared by ``input`` and ``output`` is written out twice, not as an
    anchor and an alias."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render(model: type[BaseModel]) -> str:
    """The YAML file of one CRD, byte-for-byte what ``aiso crds`` writes."""
    return _HEADER + yaml.dump(crd_for(model), Dumper=_Dumper, sort_keys=False, width=100)


def _files(out: Path) -> dict[Path, type[BaseModel]]:
    return {out / f"{info.plural}.{GROUP}.yaml": model for model, info in CRD_MODELS.items()}


def write_crds(out: Path) -> list[Path]:
    """Write every CRD under ``out``; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path, model in _files(out).items():
        path.write_text(render(model))
        written.append(path)
    return written


def check_crds(out: Path) -> list[Path]:
    """Files under ``out`` that are missing or differ from what the models generate."""
    return [
        path
        for path, model in _files(out).items()
        if not path.is_file() or path.read_text() != render(model)
    ]
