from typer.testing import CliRunner

import loradrop
from loradrop.cli import app

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["version"])
    assert result.exit_code == 0 and result.stdout.strip() == loradrop.__version__
