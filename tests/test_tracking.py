"""MLflow tracking (`tradellm.tracking`): the store checked before work starts, runs that end FAILED on SIGTERM, the default store, and
the inert stand-in when tracking is off."""
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tradellm import tracking as tr
from tests.conftest import runs_of

ROOT = Path(__file__).resolve().parents[1]


def test_sigterm_inside_any_tracked_run_marks_it_failed(mlflow_uri):
    "SFT, GRPO and PPO log through `tracked_run` without the evaluate CLI: a killed training run still ends FAILED."
    script = textwrap.dedent(f"""
        import time
        from tradellm.tracking import check_tracking, tracked_run
        uri, exp = check_tracking({mlflow_uri!r})
        with tracked_run(uri, exp, run_name='killed', tags={{'agent': 'killed-training'}}):
            print('running', flush=True); time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, '-c', script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert p.stdout.readline().strip() == 'running'
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0 and 'Terminated' in err
    assert [r.info.status for r in runs_of(mlflow_uri, agent='killed-training')] == ['FAILED']


def test_tracking_checks(tmp_path, monkeypatch):
    f = tmp_path / 'file'
    f.write_text('x')
    with pytest.raises(tr.TrackingError, match='--no-mlflow'): tr.check_tracking(f"sqlite:///{f}/sub/mlflow.db")
    t = time.time()
    with pytest.raises(tr.TrackingError, match='cannot reach the MLflow server'): tr.check_tracking('http://127.0.0.1:9')
    assert time.time() - t < 10
    monkeypatch.setenv('MLFLOW_TRACKING_URI', 'sqlite:////somewhere/m.db')
    assert tr.default_tracking_uri() == 'sqlite:////somewhere/m.db'
    monkeypatch.delenv('MLFLOW_TRACKING_URI')
    assert tr.default_tracking_uri().endswith('/data/mlflow.db') and tr.default_tracking_uri().startswith('sqlite:///')


def test_tracked_run_without_tracking_is_inert():
    with tr.tracked_run(None) as run:
        run.log_metrics({'a': 1}); run.log_series('s', [1]); run.log_artifact('nothing')
        assert run.run_id is None
