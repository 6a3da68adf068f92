"""MLflow: one MLflow run per trained model (teacher, student, baseline, ...) in the experiment
"kdistill", named <run folder>/<model>, with the run's settings as parameters and every number of
an epoch's history row as a metric at that epoch. The tracking server is $MLFLOW_TRACKING_URI
where set, else a local store in OUT/mlruns (`mlflow ui --backend-store-uri OUT/mlruns`). Needs
the mlflow package (pip install 'kdistill[mlflow]'; mlflow-skinny is enough)."""
from __future__ import annotations

import os

from ..callbacks import Callback, FitState, scalars
from ..errors import KdistillError

EXPERIMENT = "kdistill"


class MlflowLogger(Callback):
    def __init__(self, out: str):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise KdistillError("setting loggers: mlflow needs the mlflow package (pip install 'kdistill[mlflow]')"
                                ) from None
        self.out = out
        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or f"file://{os.path.abspath(os.path.join(out, 'mlruns'))}"
        if self.uri.startswith("file:"):
            # MLflow keeps its file store for local use behind this switch; a server needs no store here.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client, self.run_id = MlflowClient(self.uri), None

    def on_fit_start(self, state: FitState) -> None:
        if not state.session.ranks.main:
            return
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(EXPERIMENT)
        name = f"{os.path.basename(os.path.abspath(self.out))}/{state.session.name}"
        self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
        for key, value in vars(state.cfg).items():
            self.client.log_param(self.run_id, key, str(value)[:500])

    def on_epoch_end(self, state: FitState, row: dict) -> None:
        if self.run_id is None:
            return
        for key, value in scalars(row).items():
            self.client.log_metric(self.run_id, key, value, step=row["epoch"])

    def close(self, state: FitState) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id)
            self.run_id = None
