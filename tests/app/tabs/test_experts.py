"""The Experts tab's endpoints through ``gradio_client`` against the running studio, on a trained registry."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import gradio as gr
import pytest
from gradio_client import Client
from peft import PeftModel

from models.bases import BUILTIN_TINY, load_base
from tests.app.services.test_experts import Trained, expert_name, train_registry

FILTERS = {"base_model": "", "task": "", "kind": "", "mixture": "", "metric": "exact_match", "search": ""}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, bases_dir: Path) -> Trained:
    """The parent mixture trained twice (no add_task child: the service tests cover that)."""
    return train_registry(tmp_path_factory.mktemp("experts-tab") / "studio", bases_dir, child=False)


@pytest.fixture
def data_dir(trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The ``studio`` fixture's data dir, a private copy of the trained registry."""
    folder = tmp_path / "studio"
    shutil.copytree(trained.folder, folder)
    monkeypatch.setenv("STUDIO_DATA_DIR", str(folder))
    return folder


@pytest.fixture
def client(studio: tuple[gr.Blocks, str]) -> Client:
    return Client(studio[1], verbose=False)


def _names(client: Client, **filters: str) -> list[str]:
    table = client.predict(**(FILTERS | filters), api_name="/list_experts")
    return [row[table["headers"].index("name")] for row in table["data"]]


def test_the_table_and_its_filters(client: Client, trained: Trained) -> None:
    assert len(_names(client)) == 6
    assert set(_names(client, kind="universal")) == {
        expert_name(trained.old_run, "universal-0"),
        expert_name(trained.parent_run, "universal-0"),
    }
    assert _names(client, task="dates", search=trained.parent_run.hex[:8], kind="specific") == [
        expert_name(trained.parent_run, "dates-expert")
    ]
    assert _names(client, base_model="nobody/else") == []
    table = client.predict(**(FILTERS | {"metric": "token_f1"}), api_name="/list_experts")
    assert "token_f1" in table["headers"] and "in use" in table["headers"]
    with pytest.raises(Exception, match="unknown metric 'bleu'"):
        client.predict(**(FILTERS | {"metric": "bleu"}), api_name="/list_experts")


def test_lineage_metrics_and_spec_of_an_expert(client: Client, trained: Trained) -> None:
    name = expert_name(trained.parent_run, "dates-expert")
    lineage = client.predict(expert=name, api_name="/expert_lineage")
    assert lineage.splitlines()[0] == (
        f"dataset **dates** · **questions** → mixture **parent** → job **{trained.parent_run.hex[:8]}** → "
        f"expert **{name}**"
    )
    metrics = client.predict(expert=name, api_name="/expert_metrics")
    assert metrics["headers"][0] == "task" and [row[0] for row in metrics["data"]] == ["dates"]
    spec = client.predict(expert=name, api_name="/expert_to_spec")
    assert spec["base_model"] == BUILTIN_TINY and spec["tasks"] == ["dates", "questions"]
    for endpoint in ("/expert_lineage", "/expert_metrics", "/expert_to_spec"):
        with pytest.raises(Exception, match="no expert named 'ghost'"):
            client.predict(expert="ghost", api_name=endpoint)
    with pytest.raises(Exception, match="choose an expert first"):
        client.predict(expert="", api_name="/expert_to_spec")


def test_export_downloads_a_zip_that_peft_loads(client: Client, trained: Trained, tmp_path: Path) -> None:
    name = expert_name(trained.parent_run, "questions-expert")
    downloaded = Path(client.predict(expert=name, with_universal=True, api_name="/export_expert"))
    assert downloaded.name == f"{name}-peft.zip"
    with zipfile.ZipFile(downloaded) as archive:
        archive.extractall(tmp_path / "adapter")
    base, _ = load_base(BUILTIN_TINY, trained.bases_dir)
    model = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    assert model.peft_config["default"].r == 16  # the universal expert (8) joined with the task expert (8)
    with pytest.raises(Exception, match="no expert named 'ghost'"):
        client.predict(expert="ghost", with_universal=True, api_name="/export_expert")


def test_delete_is_refused_while_used_and_removes_an_old_run_expert(client: Client, trained: Trained) -> None:
    used = expert_name(trained.parent_run, "dates-expert")
    with pytest.raises(Exception, match=f"expert '{used}' is in use .* newest training run of mixture 'parent'"):
        client.predict(expert=used, api_name="/delete_expert")
    old = expert_name(trained.old_run, "dates-expert")
    assert client.predict(expert=old, api_name="/delete_expert") == f"Deleted expert '{old}' and its adapter file."
    names = _names(client)
    assert len(names) == 5 and old not in names and used in names
    with pytest.raises(Exception, match=f"no expert named '{old}'"):
        client.predict(expert=old, api_name="/delete_expert")
