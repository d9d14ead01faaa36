"""Resource models: manifests load, defaults apply, bad manifests say where."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from aiso.contracts import PayloadType
from aiso.errors import ManifestError
from aiso.registry import FileRegistry
from aiso.resources import ResolvedPipeline, RetryPolicy, load_manifests

ROOT = Path(__file__).resolve().parent.parent


def test_the_shipped_manifests_load_and_every_pipeline_resolves() -> None:
    catalog = load_manifests(ROOT / "manifests")
    assert {"normalize", "stats", "stt", "tts", "summarize"} <= set(catalog.services)
    for name in catalog.pipelines:
        assert isinstance(catalog.resolve(name), ResolvedPipeline), name


def test_camel_case_on_the_wire_and_step_overrides_folded_in(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text(
        """
apiVersion: aiso.dev/v1alpha1
kind: AIService
metadata: {name: echo}
spec:
  handler: pkg.mod:service
  input: [text]
  output: text
  timeoutSeconds: 7
  retry: {maxAttempts: 4, backoffSeconds: [1, 2]}
---
apiVersion: aiso.dev/v1alpha1
kind: Pipeline
metadata: {name: twice}
spec:
  input: text
  steps:
    - {name: first, service: echo}
    - {name: second, service: echo, timeoutSeconds: 3, retry: {maxAttempts: 1}}
"""
    )
    catalog = load_manifests(tmp_path)
    plan = catalog.resolve("twice")
    assert isinstance(plan, ResolvedPipeline)
    first, second = plan.steps
    assert (first.timeout_seconds, first.retry.max_attempts) == (7, 4)
    assert (second.timeout_seconds, second.retry.max_attempts) == (3, 1)
    assert second.retry.backoff_seconds == [1, 2]  # not overridden: the service's
    assert second.depends_on == ["first"]
    assert plan.output is PayloadType.TEXT
    dumped = catalog.services["echo"].spec.model_dump(by_alias=True)
    assert "timeoutSeconds" in dumped and "targetCPUUtilization" in dumped["scaling"]


def test_backoff_repeats_its_last_entry() -> None:
    policy = RetryPolicy(max_attempts=5, backoff_seconds=[1, 5])
    assert [policy.delay_before(n) for n in (2, 3, 4, 5)] == [1, 5, 5, 5]


SERVICE = (
    "kind: AIService\nmetadata: {{name: {name}}}\n"
    "spec: {{handler: {handler}, input: [{input}], output: text}}"
)


@pytest.mark.parametrize(
    ("document", "where"),
    [
        (SERVICE.format(name="x", handler="a:b", input="txt"), "spec.input.0"),
        (SERVICE.format(name="x", handler="nocolon", input="text"), "spec.handler"),
        (SERVICE.format(name="Bad_Name", handler="a:b", input="text"), "metadata.name"),
        ("kind: Pipeline\nmetadata: {name: p}\nspec: {input: text, steps: []}", "spec.steps"),
        ("kind: [unclosed", "not valid YAML"),
    ],
)
def test_bad_manifests_name_file_and_field(tmp_path: Path, document: str, where: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("apiVersion: aiso.dev/v1alpha1\n" + document)
    with pytest.raises(ManifestError, match=where.replace(".", r"\.")) as caught:
        load_manifests(tmp_path)
    assert "bad.yaml" in str(caught.value)


def test_duplicate_names_are_refused(tmp_path: Path) -> None:
    doc = "apiVersion: aiso.dev/v1alpha1\nkind: Pipeline\nmetadata: {name: p}\n"
    doc += "spec: {input: text, steps: [{name: a, service: s}]}\n"
    (tmp_path / "a.yaml").write_text(doc)
    (tmp_path / "b.yaml").write_text(doc)
    with pytest.raises(ManifestError, match="defined twice"):
        load_manifests(tmp_path)


def test_the_file_registry_notices_edits_after_its_recheck_interval(tmp_path: Path) -> None:
    shipped = ROOT / "manifests"
    for name in ("stats.yaml", "normalize.yaml"):
        (tmp_path / name).write_text((shipped / name).read_text())
    registry = FileRegistry(tmp_path, recheck_seconds=0.2)
    assert registry.pipeline("text-stats") is None
    (tmp_path / "text-stats.yaml").write_text((shipped / "text-stats.yaml").read_text())
    assert registry.pipeline("text-stats") is None  # not looked at again within the interval
    time.sleep(0.3)
    state = registry.pipeline("text-stats")
    assert state is not None and state.ready
    assert registry.pipeline("text-stats") is state  # resolved once per catalog
    (tmp_path / "stats.yaml").unlink()
    time.sleep(0.3)
    state = registry.pipeline("text-stats")
    assert state is not None and not state.ready and state.problem is not None
    assert state.problem.reason == "ServiceNotFound"
