"""Experiment tracking behind a small interface: MLflow, or a no-op for tests and dry runs.

This is the only module that imports mlflow.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DEFAULT_URI = "sqlite:///mlflow.db"


def resolve_uri(uri: str | None = None) -> str:
    """``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else an SQLite file in the working dir."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}: nested config as flat MLflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class Run:
    """One tracked run. The no-op base class is what tests and untracked runs use."""

    run_id: str = ""

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_dict(self, data: Any, artifact_file: str) -> None: ...

    def log_text(self, text: str, artifact_file: str) -> None: ...

    def log_figure(self, figure: Any, artifact_file: str) -> None: ...

    def log_input(self, dataset: Any, context: str) -> None: ...

    def end(self, status: str = "FINISHED") -> None: ...


class Tracker:
    """Starts runs; the no-op tracker returns no-op runs."""

    uri: str = ""

    @contextmanager
    def run(
        self,
        experiment: str,
        run_name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
    ) -> Iterator[Run]:
        yield Run()


class _MlflowRun(Run):
    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100], synchronous=False)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()]
        # asynchronous and batched: the training loop never waits on the store
        self.client.log_batch(self.run_id, metrics=items, synchronous=False)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        self.client.log_batch(self.run_id, tags=items, synchronous=False)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def log_input(self, dataset: Any, context: str) -> None:
        from mlflow.entities import InputTag

        self.client.log_inputs(
            self.run_id,
            datasets=[_dataset_input(dataset, context, InputTag)],
        )

    def end(self, status: str = "FINISHED") -> None:
        import mlflow

        mlflow.flush_async_logging()
        self.client.set_terminated(self.run_id, status=status)


def _dataset_input(dataset: Any, context: str, input_tag: type) -> Any:
    from mlflow.entities import DatasetInput

    return DatasetInput(
        dataset._to_mlflow_entity(), tags=[input_tag("mlflow.data.context", context)]
    )


class MlflowTracker(Tracker):
    def __init__(self, uri: str | None = None) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = resolve_uri(uri)
        self.client = MlflowClient(tracking_uri=self.uri)

    def experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        return self.client.create_experiment(name)

    @contextmanager
    def run(
        self,
        experiment: str,
        run_name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
    ) -> Iterator[Run]:
        all_tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        r = self.client.create_run(self.experiment_id(experiment), run_name=run_name, tags=all_tags)
        run = _MlflowRun(self.client, r.info.run_id)
        try:
            yield run
        except KeyboardInterrupt:
            run.set_tags({"error": "interrupted (KeyboardInterrupt)"})
            run.end("KILLED")
            raise
        except BaseException as e:
            run.set_tags({"error": f"{type(e).__name__}: {e}"[:5000]})
            run.end("FAILED")
            raise
        else:
            run.end("FINISHED")


def make_tracker(uri: str | None = None, enabled: bool = True) -> Tracker:
    return MlflowTracker(uri) if enabled else Tracker()
