"""The MLflow model registry: register a version, promote it by re-scoring, roll back.

Promotion contract (DESIGN.md): the new version and the current ``@champion`` are both scored
now, from their registry URIs, on the same current test split; the new version becomes
``@champion`` only if the primary metric improves by at least ``promote.min_improvement`` and
every guardrail passes (finite metrics, calibration ratio within bounds, scoring from the
registry URI works). The former champion keeps ``@previous``. Otherwise the new version gets
``@challenger``. Either way the decision and its numbers are written as version tags and as a
markdown artifact of the version's run.

Decisions are taken under a lock (one per registered model), so two pipelines finishing at
once are serialised: the second one compares against the champion the first one set. Within
the lock the decision record is written first and the aliases moved last; ``promotion.decision``
is the last tag written, so a version without it has no decision yet.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from esmm.config import PromoteSettings
from esmm.metrics import evaluate_predictions

if TYPE_CHECKING:  # mlflow is imported where it is used: `esmm --help` must stay fast
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"
DECISION_TAG = "promotion.decision"
SMOKE_TEST_ROWS = 1000  # rows scored through the full pyfunc path (pandas in, frame out)


class RegistryError(RuntimeError):
    """A registry operation cannot be done as asked (no such version, nothing to roll back)."""


@dataclass
class PromotionDecision:
    model_name: str
    version: str
    decision: str  # "champion" or "challenger"
    reason: str
    metric: str
    new_value: float
    champion_version: str | None = None
    champion_value: float | None = None
    min_improvement: float = 0.0
    guardrails: dict[str, str] = field(default_factory=dict)  # name -> "pass" or why it failed
    new_metrics: dict[str, float] = field(default_factory=dict)
    champion_metrics: dict[str, float] = field(default_factory=dict)
    test_rows: int = 0
    forced: bool = False

    @property
    def promoted(self) -> bool:
        return self.decision == CHAMPION

    def tags(self) -> dict[str, str]:
        """Version tags; ``promotion.decision`` last (see the module docstring)."""
        tags = {
            "promotion.reason": self.reason,
            "promotion.metric": self.metric,
            "promotion.new_value": f"{self.new_value:.6f}",
            "promotion.champion_version": str(self.champion_version or ""),
            "promotion.champion_value": (
                "" if self.champion_value is None else f"{self.champion_value:.6f}"
            ),
            "promotion.min_improvement": str(self.min_improvement),
            "promotion.test_rows": str(self.test_rows),
            "promotion.forced": str(self.forced).lower(),
            "promotion.decided_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        tags |= {f"promotion.guardrail.{name}": state for name, state in self.guardrails.items()}
        tags[DECISION_TAG] = self.decision
        return tags

    def markdown(self) -> str:
        champion = f"champion v{self.champion_version}" if self.champion_version else "no champion"
        lines = [
            f"# Promotion decision: {self.model_name} version {self.version}",
            "",
            f"**{self.decision}** — {self.reason}",
            "",
            f"Both scored now on the same test split ({self.test_rows} impressions).",
            "",
            f"| metric | v{self.version} | {champion} |",
            "| --- | --- | --- |",
        ]
        for name, value in self.new_metrics.items():
            old = self.champion_metrics.get(name)
            lines.append(f"| {name} | {value:.4f} | {'' if old is None else f'{old:.4f}'} |")
        lines += ["", "Guardrails:", ""]
        lines += [f"- {name}: {state}" for name, state in self.guardrails.items()]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        return asdict(self)


def score_model(model_uri: str, table: pa.Table) -> tuple[dict[str, float], int]:
    """Load ``model_uri`` from the registry and compute the test metrics on ``table``.

    A sample goes through the full pyfunc path (a pandas frame of raw values in), which is
    the guardrail "scoring works from the registry URI"; the whole table is then scored by the
    same loaded model on Arrow directly, and the two must agree on the sample."""
    from esmm.serving import input_example, load_model, score_table

    loaded = load_model(model_uri)
    wrapper = loaded.unwrap_python_model()
    sample = table.slice(0, SMOKE_TEST_ROWS)
    through_pyfunc = loaded.predict(input_example(wrapper.encoder, sample, SMOKE_TEST_ROWS))
    scores = score_table(wrapper.model, wrapper.encoder, table)
    head = scores.head(sample.num_rows)
    for column in ("pctr", "pcvr"):
        if not np.allclose(through_pyfunc[column], head[column], equal_nan=True, atol=1e-6):
            raise RegistryError(f"{model_uri}: pyfunc and direct scoring disagree on {column}")
    true_cvr = table["true_cvr"].to_numpy() if "true_cvr" in table.column_names else None
    pctr = scores["pctr"].to_numpy()
    metrics = evaluate_predictions(
        table["click"].to_numpy(),
        table["conversion"].to_numpy(),
        None if np.isnan(pctr).all() else pctr,
        scores["pcvr"].to_numpy(),
        true_cvr,
    )
    return metrics, table.num_rows


def _alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    return aliases_of(client, name).get(alias)


def aliases_of(client: MlflowClient, name: str) -> dict[str, str]:
    """Alias -> version (as a string). Read from the registered model: in MLflow 3.17
    search_model_versions() returns versions with empty alias lists."""
    return {alias: str(v) for alias, v in client.get_registered_model(name).aliases.items()}


def register_version(
    client: MlflowClient, model_uri: str, name: str, run_id: str, test_metrics: dict[str, float]
) -> str:
    """A new version of ``name`` from ``model_uri`` with its test metrics as tags."""
    from mlflow.exceptions import MlflowException

    with contextlib.suppress(MlflowException):  # already exists
        client.create_registered_model(
            name, description="ESMM post-click conversion-rate models (esmm pipeline)."
        )
    tags = {f"test.{key}": f"{value:.6f}" for key, value in test_metrics.items()}
    # A logged model's URI (models:/m-<id>) must come with its id: a tracking server checks
    # that the source belongs to it (a local store does not).
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    version = client.create_model_version(
        name, model_uri, run_id=run_id, tags=tags, model_id=model_id
    )
    for _ in range(60):  # local stores are READY at once; servers may take a moment
        if client.get_model_version(name, version.version).status == "READY":
            break
        time.sleep(1)
    log.info("registered %s version %s", name, version.version)
    return str(version.version)


def latest_version(client: MlflowClient, name: str) -> str:
    """The newest version number of ``name``."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException as error:
        raise RegistryError(f"no registered model {name!r}: {error.message}") from None
    if not versions:
        raise RegistryError(f"registered model {name!r} has no versions")
    return str(max(int(v.version) for v in versions))


def existing_version(client: MlflowClient, name: str, run_id: str) -> str | None:
    """The version of ``name`` already registered from ``run_id`` (a retried register step
    must not create a second one)."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException:
        return None
    return str(versions[0].version) if versions else None


@contextlib.contextmanager
def promotion_lock(tracking_uri: str, name: str) -> Iterator[None]:
    """An exclusive lock per registered model. Beside a local SQLite store the lock file is in
    the store's folder; for servers it is per machine (concurrent pipelines on one host)."""
    from esmm.tracking import local_store_folder

    folder = local_store_folder(tracking_uri) or Path(tempfile.gettempdir())
    key = hashlib.sha256(f"{tracking_uri}|{name}".encode()).hexdigest()[:12]
    path = folder / f".promotion-{key}.lock"
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _guardrails(metrics: dict[str, float], settings: PromoteSettings) -> dict[str, str]:
    low, high = settings.calibration_range
    checks = {"scoring_from_registry": "pass"}
    bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    checks["finite_metrics"] = "pass" if not bad else f"non-finite: {', '.join(bad)}"
    if settings.metric not in metrics:
        checks["primary_metric"] = f"{settings.metric} not reported by this model kind"
    calibration = metrics.get(settings.calibration_metric)
    if calibration is None:
        checks["calibration"] = f"{settings.calibration_metric} not reported by this model kind"
    elif not low <= calibration <= high:
        checks["calibration"] = (
            f"{settings.calibration_metric} {calibration:.3f} outside [{low}, {high}]"
        )
    else:
        checks["calibration"] = "pass"
    return checks


def decide(
    name: str,
    version: str,
    new_metrics: dict[str, float],
    champion_version: str | None,
    champion_metrics: dict[str, float] | None,
    settings: PromoteSettings,
    *,
    champion_error: str | None = None,
    force: bool = False,
    test_rows: int = 0,
) -> PromotionDecision:
    """The promotion rule, with no registry access (so it is tested on numbers alone)."""
    metric, margin = settings.metric, settings.min_improvement
    guardrails = _guardrails(new_metrics, settings)
    failed = {k: v for k, v in guardrails.items() if v != "pass"}
    new_value = new_metrics.get(metric, float("nan"))
    champion_value = (champion_metrics or {}).get(metric)
    decision = PromotionDecision(
        name,
        version,
        CHALLENGER,
        "",
        metric,
        new_value,
        champion_version,
        champion_value,
        margin,
        guardrails,
        new_metrics,
        champion_metrics or {},
        test_rows,
        force,
    )
    if failed:
        decision.reason = "guardrails failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items())
    elif force:
        decision.decision = CHAMPION
        decision.reason = f"promoted by hand (--force); {metric} {new_value:.4f}" + (
            f" vs champion v{champion_version} {champion_value:.4f}"
            if champion_value is not None
            else ""
        )
    elif champion_version is None:
        decision.decision, decision.reason = CHAMPION, "first model: there is no champion yet"
    elif champion_value is None:
        decision.decision = CHAMPION
        decision.reason = (
            f"champion v{champion_version} cannot score the current test data "
            f"({champion_error or f'no {metric}'}); replaced"
        )
    elif new_value >= champion_value + margin:
        decision.decision = CHAMPION
        decision.reason = (
            f"{metric} {new_value:.4f} >= champion v{champion_version} {champion_value:.4f} "
            f"+ margin {margin}"
        )
    else:
        decision.reason = (
            f"{metric} {new_value:.4f} < champion v{champion_version} {champion_value:.4f} "
            f"+ margin {margin}: not better by the margin"
        )
    return decision


def promote_version(
    client: MlflowClient,
    tracking_uri: str,
    name: str,
    version: str,
    test_table: pa.Table,
    settings: PromoteSettings,
    *,
    force: bool = False,
) -> PromotionDecision:
    """Score ``version`` and the champion on ``test_table``, decide, record, move aliases."""
    from mlflow.exceptions import MlflowException

    try:
        model_version = client.get_model_version(name, version)
    except MlflowException as error:
        raise RegistryError(f"no version {version} of registered model {name!r}") from error
    with promotion_lock(tracking_uri, name):
        try:
            new_metrics, rows = score_model(f"models:/{name}/{version}", test_table)
        except Exception as error:  # the guardrail: it must score from the registry
            decision = decide(name, version, {}, None, None, settings, test_rows=0)
            decision.guardrails["scoring_from_registry"] = f"failed: {error}"
            decision.reason = f"guardrails failed: scoring from the registry: {error}"
            _record(client, model_version, decision)
            return decision
        champion_version = _alias_version(client, name, CHAMPION)
        champion_metrics, champion_error = None, None
        if champion_version == version:
            raise RegistryError(f"version {version} of {name!r} is already @champion")
        if champion_version is not None:
            try:
                champion_metrics, _ = score_model(f"models:/{name}@{CHAMPION}", test_table)
            except Exception as error:  # recorded in the decision, not hidden
                champion_error = f"{type(error).__name__}: {error}"
        decision = decide(
            name,
            version,
            new_metrics,
            champion_version,
            champion_metrics,
            settings,
            champion_error=champion_error,
            force=force,
            test_rows=rows,
        )
        _record(client, model_version, decision)
        if decision.promoted:
            if champion_version is not None:
                client.set_registered_model_alias(name, PREVIOUS, champion_version)
            client.set_registered_model_alias(name, CHAMPION, version)
            if _alias_version(client, name, CHALLENGER) == version:
                client.delete_registered_model_alias(name, CHALLENGER)
        else:
            client.set_registered_model_alias(name, CHALLENGER, version)
    log.info("%s v%s -> @%s: %s", name, version, decision.decision, decision.reason)
    return decision


def _record(client: MlflowClient, model_version, decision: PromotionDecision) -> None:
    if model_version.run_id:
        client.log_text(
            model_version.run_id,
            decision.markdown(),
            f"promotion/decision-v{decision.version}.md",
        )
    for key, value in decision.tags().items():
        client.set_model_version_tag(decision.model_name, decision.version, key, value[:5000])


def rollback(client: MlflowClient, tracking_uri: str, name: str) -> tuple[str, str]:
    """Move ``@champion`` back to ``@previous``; returns (demoted version, restored version)."""
    from mlflow.exceptions import MlflowException

    with promotion_lock(tracking_uri, name):
        try:
            aliases = aliases_of(client, name)
        except MlflowException as error:
            raise RegistryError(f"no registered model {name!r}") from error
        champion, previous = aliases.get(CHAMPION), aliases.get(PREVIOUS)
        if previous is None:
            raise RegistryError(
                f"{name!r} has no @{PREVIOUS} version to roll back to (champion: {champion})"
            )
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if champion is not None:
            client.set_model_version_tag(name, champion, "promotion.rolled_back_at", stamp)
            client.set_model_version_tag(name, champion, DECISION_TAG, "rolled_back")
        client.set_model_version_tag(name, previous, "promotion.restored_at", stamp)
        client.set_registered_model_alias(name, CHAMPION, previous)
        client.delete_registered_model_alias(name, PREVIOUS)
    log.info("%s: @champion rolled back from v%s to v%s", name, champion, previous)
    return str(champion), str(previous)
