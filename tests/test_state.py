import json
import os

import pytest
import torch

from ifcl.files import atomic_path, write_json
from ifcl.state import StateError, load_state, save_state


def test_roundtrip_keeps_tensors_and_meta(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5), "empty": torch.zeros(0)}
    save_state(tmp_path / "s.safetensors", tensors, {"task": 2, "name": "x"})
    back, meta = load_state(tmp_path / "s.safetensors")
    assert meta == {"task": 2, "name": "x"}
    assert set(back) == set(tensors)
    for k in tensors:
        assert torch.equal(back[k], tensors[k])


def test_same_content_gives_same_bytes(tmp_path):
    t = {"w": torch.linspace(0, 1, 10)}
    save_state(tmp_path / "a.safetensors", t, {"k": 1})
    save_state(tmp_path / "b.safetensors", t, {"k": 1})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_tampered_tensor_bytes_are_refused(tmp_path):
    path = tmp_path / "s.safetensors"
    save_state(path, {"w": torch.ones(16)}, {})
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # flip bits inside the tensor payload
    path.write_bytes(bytes(raw))
    with pytest.raises(StateError, match="s.safetensors.*modified"):
        load_state(path)


def test_truncated_or_foreign_files_are_refused(tmp_path):
    path = tmp_path / "s.safetensors"
    save_state(path, {"w": torch.ones(16)}, {})
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(StateError, match="s.safetensors"):
        load_state(path)
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(StateError, match="not a state file written by ifcl"):
        load_state(tmp_path / "plain.safetensors")
    with pytest.raises(StateError, match="does not exist"):
        load_state(tmp_path / "missing.safetensors")


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target, "w") as f:
            f.write("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "out.json.sha256"]


def test_a_successful_write_removes_what_killed_writes_of_that_file_left(tmp_path):
    target = tmp_path / "run[1].json"  # glob characters in the name are taken literally
    killed = [tmp_path / ".run[1].json.k3j9x.part", tmp_path / ".run[1].json.0a1b2.part"]
    others = [tmp_path / ".run1.json.k3j9x.part", tmp_path / ".other.json.zz.part", tmp_path / "run[1].json.part"]
    for f in killed + others:
        f.write_text("half")
    write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, target.name + ".sha256"] +
                                                                 [f.name for f in others])


def test_written_files_get_the_permissions_of_a_plain_open(tmp_path):
    """mkstemp's temporary files are private (0600); a result must be readable by the lab, as open() would make it."""
    mask = os.umask(0o022)
    try:
        write_json(tmp_path / "shared.json", {"a": 1})
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(mask)
    assert (tmp_path / "shared.json").stat().st_mode & 0o777 == (tmp_path / "plain.txt").stat().st_mode & 0o777 == 0o644


def _rewrite(path, meta=None, header=None, tail=b""):
    """The state file at ``path`` with its header's ifcl record given another ``meta`` (its digest kept), or its
    whole header replaced by ``header`` (bytes), and ``tail`` appended."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    if header is None:
        parsed = json.loads(raw[8:8 + n])
        record = json.loads(parsed["__metadata__"]["ifcl"])
        record["meta"] = meta
        parsed["__metadata__"]["ifcl"] = json.dumps(record, sort_keys=True)
        header = json.dumps(parsed, separators=(",", ":")).encode()
    header = header.ljust(-(-len(header) // 8) * 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + n:] + tail)


def test_a_metadata_value_changed_with_the_tensors_kept_is_refused(tmp_path):
    """The header's metadata is under the digest too: an InfLoRA memory whose `layer_kinds` was edited (tensors
    unchanged, the file otherwise as safetensors writes it) is refused by the load and by the check."""
    from ifcl.integrity import state_problem

    path = tmp_path / "memory.safetensors"
    save_state(path, {"basis.0": torch.randn(4, 2)}, {"layer_kinds": ["attn", "attn"], "task": 2})
    _rewrite(path, meta={"layer_kinds": ["attn", "mlp"], "task": 2})
    with pytest.raises(StateError, match="memory.safetensors was modified after it was written"):
        load_state(path)
    assert "was modified" in state_problem(path)


@pytest.mark.parametrize("case", ["spacing", "appended", "list header", "nested header", "nested meta",
                                  "metadata added", "header length"])
def test_every_byte_of_a_state_file_is_checked_and_a_foreign_header_is_refused_naming_the_file(tmp_path, case):
    """A header rewritten with other spacing, bytes after the last tensor, a header that is valid JSON but not an
    object or nested past any limit, metadata added beside ifcl's: each is refused with a StateError naming the
    file (never an AttributeError or a RecursionError), and the check (without torch) says why."""
    from ifcl.integrity import state_problem

    path = tmp_path / "s.safetensors"
    save_state(path, {"w": torch.ones(3)}, {"k": 1})
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    parsed = json.loads(raw[8:8 + n])
    if case == "spacing":
        _rewrite(path, header=json.dumps(parsed).encode())
    elif case == "appended":
        _rewrite(path, meta={"k": 1}, tail=b"\0" * 8)
    elif case == "list header":
        _rewrite(path, header=b"[1, 2, 3]")
    elif case == "nested header":
        _rewrite(path, header=b"[" * 100000 + b"]" * 100000)
    elif case == "nested meta":
        parsed["__metadata__"]["ifcl"] = "[" * 100000 + "]" * 100000
        _rewrite(path, header=json.dumps(parsed, separators=(",", ":")).encode())
    elif case == "metadata added":
        parsed["__metadata__"]["note"] = "x"
        _rewrite(path, header=json.dumps(parsed, separators=(",", ":")).encode())
    else:
        path.write_bytes((10**12).to_bytes(8, "little") + raw[8:])
    with pytest.raises(StateError, match="s.safetensors"):
        load_state(path)
    assert state_problem(path)
