"""The artifact store: round trips, atomic writes, and refusal of every key that could leave the root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from models.storage import ArtifactNotFoundError, ArtifactStore, InvalidKeyError, new_key, validate_key

TRAVERSALS = [
    "../outside",
    "a/../../outside",
    "a/..",
    "/etc/passwd",
    "//etc/passwd",
    "a//b",
    "./a",
    "a/./b",
    "..",
    "",
    "a\\..\\b",
    "C:/windows",
    "file:///etc/passwd",
    "a/\x00b",
    "a/b\n",
    ".hidden",
    "a/-dash-first",
    "x" * 600,
]


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(str(tmp_path / "artifacts"))


@pytest.mark.parametrize("key", TRAVERSALS)
def test_unsafe_keys_are_refused_before_touching_the_filesystem(store: ArtifactStore, key: str) -> None:
    with pytest.raises(InvalidKeyError):
        validate_key(key)
    for operation in (store.exists, store.get_bytes, store.delete):
        with pytest.raises(InvalidKeyError):
            operation(key)
    with pytest.raises(InvalidKeyError):
        store.put_bytes(key, b"x")


def test_nothing_is_written_outside_the_root_by_a_refused_key(tmp_path: Path, store: ArtifactStore) -> None:
    with pytest.raises(InvalidKeyError):
        store.put_bytes("../escaped", b"x")
    assert not (tmp_path / "escaped").exists()


def test_a_symlink_inside_the_store_cannot_lead_outside(tmp_path: Path, store: ArtifactStore) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    os.symlink(outside, Path(store.root) / "link")
    with pytest.raises(InvalidKeyError, match="outside the store"):
        store.get_bytes("link/secret")


def test_put_get_exists_delete_list(store: ArtifactStore, tmp_path: Path) -> None:
    digest = store.put_bytes("datasets/u1/data.jsonl", b'{"a": 1}\n')
    assert len(digest) == 64
    assert store.exists("datasets/u1/data.jsonl")
    assert store.get_bytes("datasets/u1/data.jsonl") == b'{"a": 1}\n'
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(3 << 20))
    store.put_file("adapters/e1/adapter.safetensors", source)
    copy = tmp_path / "copy.bin"
    store.get_file("adapters/e1/adapter.safetensors", copy)
    assert copy.read_bytes() == source.read_bytes()
    assert store.list() == ["adapters/e1/adapter.safetensors", "datasets/u1/data.jsonl"]
    assert store.list("datasets") == ["datasets/u1/data.jsonl"]
    store.delete("datasets")
    assert not store.exists("datasets/u1/data.jsonl")
    with pytest.raises(ArtifactNotFoundError):
        store.get_bytes("datasets/u1/data.jsonl")


def test_a_failed_write_leaves_no_file_and_no_temporary(store: ArtifactStore) -> None:
    with pytest.raises(RuntimeError), store.writer("adapters/half.safetensors") as handle:
        handle.write(b"partial")
        raise RuntimeError("crash mid-write")
    assert not store.exists("adapters/half.safetensors")
    assert store.list() == []
    assert [p for p in Path(store.root).rglob("*") if p.is_file()] == []


def test_overwrite_replaces_whole_content(store: ArtifactStore) -> None:
    store.put_bytes("k", b"first version, longer")
    store.put_bytes("k", b"second")
    assert store.get_bytes("k") == b"second"


def test_new_key_uses_a_generated_name(store: ArtifactStore) -> None:
    first, second = new_key("datasets", "local"), new_key("datasets", "local")
    assert first != second and first.startswith("datasets/local/")


def test_any_fsspec_url_works(tmp_path: Path) -> None:
    memory = ArtifactStore("memory://mole-test-store")
    memory.put_bytes("a/b", b"in memory")
    assert memory.get_bytes("a/b") == b"in memory" and memory.list("a") == ["a/b"]
    memory.delete("a")
    file_url = ArtifactStore(f"file://{tmp_path / 'via-url'}")
    file_url.put_bytes("x", b"1")
    assert (tmp_path / "via-url" / "x").read_bytes() == b"1"
