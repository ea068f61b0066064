"""The engine's atomic writers: a reader never sees half a file, and a failed write leaves the old one."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from headlab.engine.core.files import write_atomic_safetensors, write_atomic_text


def test_safetensors_are_written_whole_with_their_metadata(tmp_path):
    path = tmp_path / "deep" / "t.safetensors"
    x = torch.arange(12.0).reshape(3, 4)
    assert write_atomic_safetensors(path, {"x": x.t(), "y": torch.ones(2)}, metadata={"kind": "test"}) == path
    back = load_file(str(path))
    assert torch.equal(back["x"], x.t()) and torch.equal(back["y"], torch.ones(2))  # a strided view is made whole
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"kind": "test"}
    assert [p.name for p in path.parent.iterdir()] == ["t.safetensors"]  # no temporary file left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "t.safetensors"
    write_atomic_safetensors(path, {"x": torch.zeros(2)})
    with pytest.raises(Exception):
        write_atomic_safetensors(path, {"x": "not a tensor"})  # type: ignore[dict-item]
    assert torch.equal(load_file(str(path))["x"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]
    text = tmp_path / "a.json"
    write_atomic_text(text, "{}")
    assert text.read_text() == "{}" and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
