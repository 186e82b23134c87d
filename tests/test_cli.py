"""The `tradellm` entry point, end to end: the installed console script and the dispatcher."""
import subprocess
import sys

from tradellm import __version__
from tradellm.cli import COMMANDS, main


def run(*args):
    return subprocess.run([sys.executable, '-m', 'tradellm.cli', *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_command():
    r = run('--help')
    assert r.returncode == 0
    for name in COMMANDS: assert name in r.stdout


def test_version(capsys):
    assert main(['--version']) == 0
    assert capsys.readouterr().out.strip() == __version__


def test_unknown_command_names_the_commands(capsys):
    assert main(['leaderbord']) == 2
    err = capsys.readouterr().err
    assert "unknown command 'leaderbord'" in err and 'leaderboard' in err


def test_every_command_answers_help():
    "Each command's module imports and its parser answers --help with exit 0."
    for name in COMMANDS:
        try: rc = main([name, '--help'])
        except SystemExit as e: rc = e.code
        assert rc == 0, name


def test_missing_extra_is_a_clear_error(monkeypatch, capsys):
    import importlib
    real = importlib.import_module

    def fake(name, *a, **k):
        if name == 'tradellm.server':
            err = ImportError("No module named 'openenv'"); err.name = 'openenv'; raise err
        return real(name, *a, **k)
    monkeypatch.setattr(importlib, 'import_module', fake)
    assert main(['serve']) == 2
    err = capsys.readouterr().err
    assert 'openenv' in err and "pip install 'tradellm[all]'" in err


def test_data_check_through_the_console_script(tmp_path):
    from tradellm.data import save_panel, synthetic_panel
    save_panel(synthetic_panel(n_days=60, symbols=('AAA', 'BBB')), tmp_path)
    r = run('data', 'check', str(tmp_path), '--json')
    assert r.returncode == 0, r.stderr
    assert '"AAA"' in r.stdout or 'AAA' in r.stdout
