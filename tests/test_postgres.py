"""Optuna's RDB storage on the PostgreSQL server of the test setup (distributed search workers)."""

import optuna
import pytest
from optuna.trial import TrialState

pytestmark = pytest.mark.slow  # a PostgreSQL server


def test_rdb_storage_roundtrip(pg_storage_url):
    writer = optuna.storages.RDBStorage(pg_storage_url)
    reader = optuna.storages.RDBStorage(pg_storage_url)  # a second worker, its own connections
    try:
        study = optuna.create_study(study_name="roundtrip", storage=writer)
        study.optimize(lambda trial: trial.suggest_float("x", -1.0, 1.0) ** 2, n_trials=3)

        loaded = optuna.load_study(study_name="roundtrip", storage=reader)
        trials = loaded.get_trials(states=(TrialState.COMPLETE,))
        assert [t.number for t in trials] == [0, 1, 2]
        assert [t.value for t in trials] == pytest.approx([t.params["x"] ** 2 for t in trials])
        assert loaded.best_value == min(t.value for t in study.trials)
    finally:
        writer.engine.dispose()
        reader.engine.dispose()
