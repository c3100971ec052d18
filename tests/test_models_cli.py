import pytest

from fusegpt.cli import main
from fusegpt.models import ModelSourceError, resolve_source


def test_unknown_model_lists_accepted(tmp_path):
    with pytest.raises(ModelSourceError, match="smollm2-135m"):
        resolve_source("no-such-model")
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_source(str(tmp_path / "x.gguf"))
    with pytest.raises(ModelSourceError, match="config.json"):
        resolve_source(str(tmp_path))


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["eval", "no-such-model"]) == 2
    assert "accepted are" in capsys.readouterr().err
    (tmp_path / "f").write_text("x")
    assert main(["drop", "smollm2-135m", "--blocks", "1", "--out", str(tmp_path)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "f").read_text() == "x"
