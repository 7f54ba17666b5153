"""Safe loading: nothing we load from a user path can run code, and exports are safetensors.

* An ``ast`` audit of ``src/``: every ``torch.load`` passes ``weights_only=True``; ``pickle``
  loading exists only in ``data/_archive.py`` (its restricted unpickler for CIFAR archives).
* :func:`load_pruned` refuses a pickle crafted to run code, without running it.
* :func:`save_pruned` / :func:`load_pruned` round-trip tensors bit for bit with their metadata.
* :func:`save_pruned` is atomic and never overwrites a file unless asked to.
"""

from __future__ import annotations

import ast
import errno
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

import scl_lightning
import scl_lightning.deploy.export as export_module
from scl_lightning import export_pruned, global_sparsity, masked_modules, sparsify
from scl_lightning.deploy.export import (
    PRUNED_FORMAT,
    PRUNED_METADATA_KEYS,
    load_pruned,
    save_pruned,
)

SRC = Path(__file__).resolve().parents[1] / "src" / "scl_lightning"
#: The one module allowed to unpickle: a restricted unpickler for the official CIFAR archives.
PICKLE_ALLOWED = SRC / "data" / "_archive.py"

TORCH_LOADS = {"torch.load", "torch.serialization.load"}
PICKLE_LOADS = {
    f"{module}.{name}"
    for module in ("pickle", "_pickle", "cloudpickle", "dill")
    for name in ("load", "loads", "Unpickler", "_Unpickler")
} | {"joblib.load", "shelve.open"}


# -- the audit ------------------------------------------------------------------------------------


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> the dotted name it is bound to by the file's imports (anywhere in it)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                # `import torch.serialization` binds `torch`; `import torch as th` binds `th`
                top = a.name.split(".")[0]
                names[a.asname or top] = a.name if a.asname else top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(node: ast.expr, aliases: dict[str, str]) -> str | None:
    """``torch.load`` for ``th.load`` after ``import torch as th``; None for anything else."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in aliases:
        return None
    return ".".join([aliases[node.id], *reversed(parts)])


def _weights_only(call: ast.Call) -> bool:
    # `**kwargs` could hide weights_only=False: only a literal True counts
    return any(
        k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
        for k in call.keywords
    ) and all(k.arg is not None for k in call.keywords)


def unsafe_loads(source: str, *, pickle_allowed: bool = False) -> tuple[list[str], int]:
    """Problems in ``source`` (``"line N: ..."``) and the number of torch.load calls checked."""
    tree = ast.parse(source)
    aliases = _aliases(tree)
    problems: list[str] = []
    checked: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _dotted(node.func, aliases) in TORCH_LOADS:
            checked.add(id(node.func))
            if not _weights_only(node):
                problems.append(f"line {node.lineno}: torch.load without weights_only=True")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Name | ast.Attribute):
            continue
        name = _dotted(node, aliases)
        if name in TORCH_LOADS and id(node) not in checked:
            problems.append(f"line {node.lineno}: {name} used other than in a checked call")
        elif name in PICKLE_LOADS and not pickle_allowed:
            problems.append(f"line {node.lineno}: {name} unpickles")
    for node in ast.walk(tree):
        # numpy.load refuses pickles unless allow_pickle=True (or **kwargs that may hold it)
        if isinstance(node, ast.Call) and _dotted(node.func, aliases) == "numpy.load":
            if any(k.arg in ("allow_pickle", None) for k in node.keywords):
                problems.append(f"line {node.lineno}: numpy.load with allow_pickle")
    return problems, len(checked)


def test_src_loads_only_with_weights_only_and_never_unpickles():
    files = sorted(SRC.rglob("*.py"))
    assert PICKLE_ALLOWED in files
    problems, checked = [], 0
    for path in files:
        found, n = unsafe_loads(
            path.read_text(encoding="utf-8"), pickle_allowed=path == PICKLE_ALLOWED
        )
        problems += [f"{path.relative_to(SRC.parent)}: {p}" for p in found]
        checked += n
    assert problems == []
    assert checked >= 1  # report.py loads checkpoints: the audit does see torch.load calls
    # ... and the exemption is needed: _archive.py does unpickle
    assert unsafe_loads(PICKLE_ALLOWED.read_text(encoding="utf-8"))[0]


@pytest.mark.parametrize(
    "source",
    [
        "import torch\ntorch.load(p)",
        "import torch\ntorch.load(p, weights_only=False)",
        "import torch\ntorch.load(p, weights_only=flag)",
        "import torch\ntorch.load(p, weights_only=True, **kwargs)",
        "import torch as th\nth.load(p, map_location='cpu')",
        "import torch.serialization\ntorch.serialization.load(p)",
        "from torch import load\nload(p)",
        "from torch import load as tl\ntl(p)",
        "import torch\nloader = torch.load",
        "import pickle\npickle.loads(b)",
        "import pickle as pk\npk.load(f)",
        "from pickle import load\nload(f)",
        "import pickle\nclass U(pickle._Unpickler): pass",
        "def f(p):\n    import pickle\n    return pickle.load(open(p, 'rb'))",
        "import joblib\njoblib.load(p)",
        "import numpy\nnumpy.load(p, allow_pickle=True)",
        "import numpy as np\nnp.load(p, allow_pickle=True)",
    ],
)
def test_audit_flags_unsafe_loading(source):
    assert unsafe_loads(source)[0], source


@pytest.mark.parametrize(
    "source",
    [
        "import torch\ntorch.load(p, weights_only=True)",
        "import torch\ntorch.load(p, map_location='cpu', weights_only=True)",
        "import torch\ntorch.save(x, p)",
        "import json, yaml\njson.load(f)\nyaml.safe_load(f)",
        "import numpy as np\nnp.load(p)",
        "from safetensors.torch import load_file\nload_file(p)",
        "def load(p): ...\nload(p)",
    ],
)
def test_audit_accepts_safe_loading(source):
    assert unsafe_loads(source)[0] == []


# -- a file crafted to run code -------------------------------------------------------------------


class _RunsCode:
    """Unpickling this object calls ``os.mkdir(marker)``: a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _torch_zip(obj, path):
    torch.save(obj, path)


def _torch_legacy(obj, path):
    torch.save(obj, path, _use_new_zipfile_serialization=False)


def _plain_pickle(obj, path):
    path.write_bytes(pickle.dumps(obj))


@pytest.mark.parametrize(
    ("write", "hint"),
    [
        (_torch_zip, "it looks like a torch.save zip archive, which was not unpickled"),
        (_torch_legacy, "it looks like a pickle, which was not unpickled"),
        (_plain_pickle, "it looks like a pickle, which was not unpickled"),
    ],
    ids=["torch-save", "torch-save-legacy", "pickle"],
)
def test_load_pruned_refuses_a_pickle_that_runs_code(tmp_path, write, hint):
    marker = tmp_path / "code-ran"
    path = tmp_path / "model.safetensors"  # the name promises safetensors; the bytes do not
    write({"0.weight": torch.ones(2, 2), "payload": _RunsCode(marker)}, path)
    with pytest.raises(ValueError) as info:
        load_pruned(path)
    message = str(info.value)
    assert message.startswith(
        f"load_pruned: {path} is not a safetensors file (truncated or another format; {hint})"
    )
    assert "\n" not in message
    assert not marker.exists()
    # torch.load with weights_only=True refuses it too (a file object: torch 2.13 reads a path
    # named *.safetensors with safetensors)
    if write is not _plain_pickle:
        with path.open("rb") as f, pytest.raises(pickle.UnpicklingError, match="Weights only"):
            torch.load(f, weights_only=True)
        assert not marker.exists()
    # the payload is real: unrestricted unpickling runs it (so the checks above can fail)
    with path.open("rb") as f:
        if write is _plain_pickle:
            pickle.load(f)
        else:
            torch.load(f, weights_only=False)
    assert marker.is_dir()


# -- round trip -----------------------------------------------------------------------------------


def _plain_net() -> nn.Sequential:
    """Conv, BatchNorm (an int64 scalar buffer), a non-contiguous weight and a layer used twice
    (two state-dict keys sharing one tensor): what safetensors refuses without copies."""
    torch.manual_seed(0)
    shared = nn.Linear(6, 6)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.BatchNorm2d(2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32, 6),
        nn.ReLU(),
        shared,
        nn.ReLU(),
        shared,
    )
    net[4].weight = nn.Parameter(torch.randn(32, 6).t())
    return net


def _masked_net() -> nn.Sequential:
    net = sparsify(_plain_net())
    with torch.no_grad():
        for _, layer in masked_modules(net):
            layer.mask.copy_(torch.randn_like(layer.mask))  # about half pruned
    net(torch.randn(8, 1, 6, 6))  # BatchNorm running statistics and its batch counter
    return net.eval()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_round_trip_is_bit_exact_with_metadata(tmp_path, dtype):
    net = _masked_net().to(dtype)
    expected = export_pruned(net).state_dict()
    # the awkward cases are really there
    assert not expected["4.weight"].is_contiguous()
    assert expected["6.weight"].data_ptr() == expected["8.weight"].data_ptr()
    assert expected["1.num_batches_tracked"].dim() == 0
    before = {k: v.clone() for k, v in net.state_dict().items()}

    path = tmp_path / "sub" / "net.safetensors"
    extra = {"epoch": 3, "lr": 0.1, "final": True, "note": "digits run"}
    assert save_pruned(net, path, extra) == path
    tensors, meta = load_pruned(str(path))

    assert tensors.keys() == expected.keys()
    for name, value in expected.items():
        assert tensors[name].dtype == value.dtype and tensors[name].shape == value.shape
        assert torch.equal(_bits(tensors[name]), _bits(value)), name
    sparsity = global_sparsity(net)
    assert 0.2 < sparsity < 0.8
    total = sum(layer.mask.numel() for _, layer in masked_modules(net))
    active = sum(int((layer.mask > 0).sum()) for _, layer in masked_modules(net))
    assert meta == {
        "format": PRUNED_FORMAT,
        "scl_lightning_version": scl_lightning.__version__,
        "network": "Sequential",
        "global_sparsity": str(sparsity),
        "active_connections": str(active),
        "total_connections": str(total),
        "epoch": "3",
        "lr": "0.1",
        "final": "True",
        "note": "digits run",
    }
    assert set(PRUNED_METADATA_KEYS) <= set(meta)
    # the model was not touched
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    # the never-masked architecture takes the tensors as they are, and computes the same
    if dtype is torch.float32:
        plain = _plain_net().eval()
        plain.load_state_dict(tensors, strict=True)
        x = torch.randn(4, 1, 6, 6)
        torch.testing.assert_close(plain(x), net(x), rtol=0, atol=0)


def test_load_pruned_reads_any_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.arange(3.0)}, tmp_path / "other.safetensors")
    tensors, meta = load_pruned(tmp_path / "other.safetensors")
    assert torch.equal(tensors["w"], torch.arange(3.0)) and meta == {}


@pytest.mark.parametrize("cut", [0, 3, 8, 20, -1], ids=["empty", "3B", "8B", "header", "last"])
def test_load_pruned_refuses_truncated_files(tmp_path, cut):
    path = save_pruned(_masked_net(), tmp_path / "net.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(
        ValueError,
        match=r"^load_pruned: .*net\.safetensors is not a safetensors file "
        r"\(truncated or another format\): .+; export the model again with "
        r"scl_lightning\.save_pruned$",
    ):
        load_pruned(path)


def test_load_pruned_missing_file_or_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^load_pruned: .*nope\.safetensors does not"):
        load_pruned(tmp_path / "nope.safetensors")
    with pytest.raises(IsADirectoryError, match=r"is a directory; pass the \.safetensors file"):
        load_pruned(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"path": "net.pt"}, ValueError, r"path must end in \.safetensors, got '.*net\.pt'"),
        ({"path": 3}, TypeError, r"path must be a str or os\.PathLike, got int"),
        (
            {"metadata": {"format": "mine"}},
            ValueError,
            r"metadata key 'format' is written by save_pruned itself",
        ),
        ({"metadata": {"": "x"}}, TypeError, r"metadata keys must be non-empty strings"),
        ({"metadata": {"cfg": [1]}}, TypeError, r"metadata\['cfg'\] is a list"),
        ({"metadata": {"cfg": None}}, TypeError, r"metadata\['cfg'\] is a NoneType"),
        ({"model": nn.Linear(2, 2)}, ValueError, r"Linear has no masked layer"),
    ],
    ids=["suffix", "path-type", "reserved", "empty-key", "list", "none", "dense"],
)
def test_save_pruned_validates(tmp_path, monkeypatch, kwargs, error, match):
    monkeypatch.chdir(tmp_path)
    args = {"model": _masked_net(), "path": "net.safetensors", "metadata": None, **kwargs}
    with pytest.raises(error, match=match):
        save_pruned(**args)
    assert list(tmp_path.iterdir()) == []


# -- atomic writes, no silent overwrite -----------------------------------------------------------


def _other_model_file(path: Path) -> bytes:
    net = _masked_net()
    with torch.no_grad():
        next(iter(masked_modules(net)))[1].mask.fill_(-1.0)
    save_pruned(net, path, {"run": "previous"})
    return path.read_bytes()


def test_existing_file_is_kept_unless_overwrite(tmp_path):
    path = tmp_path / "net.safetensors"
    old = _other_model_file(path)
    with pytest.raises(
        FileExistsError,
        match=r"^save_pruned: .*net\.safetensors already exists; pass overwrite=True to replace "
        r"it, or choose another path$",
    ):
        save_pruned(_masked_net(), path, {"run": "new"})
    assert path.read_bytes() == old
    assert load_pruned(path)[1]["run"] == "previous"

    save_pruned(_masked_net(), path, {"run": "new"}, overwrite=True)
    assert load_pruned(path)[1]["run"] == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.safetensors"]


def test_save_pruned_refuses_a_directory(tmp_path):
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(IsADirectoryError, match=r"d\.safetensors is a directory"):
        save_pruned(_masked_net(), tmp_path / "d.safetensors", overwrite=True)


def _failing_writer(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"\x00" * 100)  # a partial file, then the disk fills up
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("existing", [True, False], ids=["replace", "new"])
def test_failure_mid_write_leaves_previous_file_and_no_temp(tmp_path, monkeypatch, existing):
    path = tmp_path / "net.safetensors"
    old = _other_model_file(path) if existing else None
    monkeypatch.setattr(export_module, "save_file", _failing_writer)
    with pytest.raises(OSError, match="No space left on device"):
        save_pruned(_masked_net(), path, overwrite=True)
    if existing:
        assert path.read_bytes() == old
        assert load_pruned(path)[1]["run"] == "previous"
    else:
        assert not path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["net.safetensors"] if existing else [])


def _no_links(src, dst):
    raise OSError(errno.EPERM, "Operation not permitted")


@pytest.mark.parametrize("links", [True, False], ids=["hard-link", "no-hard-links"])
def test_a_file_appearing_during_the_write_is_not_clobbered(tmp_path, monkeypatch, links):
    """Another process creates the file after the first check: the final step still refuses."""
    if not links:
        monkeypatch.setattr(export_module.os, "link", _no_links)
    path = tmp_path / "net.safetensors"
    real = export_module.save_file

    def racing_writer(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        path.write_bytes(b"someone else's file")

    monkeypatch.setattr(export_module, "save_file", racing_writer)
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        save_pruned(_masked_net(), path)
    assert path.read_bytes() == b"someone else's file"
    assert [p.name for p in tmp_path.iterdir()] == ["net.safetensors"]


def test_file_systems_without_hard_links(tmp_path, monkeypatch):
    monkeypatch.setattr(export_module.os, "link", _no_links)
    path = save_pruned(_masked_net(), tmp_path / "net.safetensors")
    assert load_pruned(path)[1]["format"] == PRUNED_FORMAT
    assert [p.name for p in tmp_path.iterdir()] == ["net.safetensors"]
    with pytest.raises(FileExistsError, match="already exists"):
        save_pruned(_masked_net(), path)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_written_file_has_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    path = save_pruned(_masked_net(), tmp_path / "net.safetensors")
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
