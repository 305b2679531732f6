"""CIFAR-10/100 in torchvision's folder format, read without running code from the files.

The batches are pickles (Python 2's ``cPickle`` for the official archives). A data file a user
received is untrusted, and ``pickle.load`` runs whatever a planted file names, so the files are
read with a restricted unpickler: it resolves only the few numpy names that rebuild an array
(``_reconstruct``, ``_frombuffer``, ``ndarray``, ``dtype``, ``scalar``) and ``_codecs.encode``
(Python 3 pickles of bytes). Any other global is refused before anything is called. The result
is then checked against the real format: a dict with a uint8 (N, 3072) ``data`` array and N int
labels in range, and a meta dict whose class names are strings.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from suite.errors import UserError, first_line

PIXELS = 3 * 32 * 32  # one row of ``data``: the CHW image flattened


@dataclass(frozen=True)
class CifarLayout:
    title: str
    folder: str  # under data.root
    train: tuple[str, ...]
    test: str
    meta: str
    label_key: str  # in each batch
    names_key: str  # in the meta file
    num_classes: int


LAYOUTS = {
    "cifar10": CifarLayout(
        "CIFAR-10",
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "batches.meta",
        "labels",
        "label_names",
        10,
    ),
    "cifar100": CifarLayout(
        "CIFAR-100", "cifar-100-python", ("train",), "test", "meta", "fine_labels",
        "fine_label_names", 100,
    ),
}  # fmt: skip

# the globals an array pickle needs (numpy 1.x spells the module numpy.core, 2.x numpy._core)
_ALLOWED = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),  # protocols 2-4: an empty array, then state
        ("numpy.core.multiarray", "scalar"),  # a numpy number (labels saved as np.int64)
        ("numpy.core.numeric", "_frombuffer"),  # protocol 5: the array from its bytes
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # Python 3 protocol-2 pickles write bytes as str.encode
    }
)


def _resolve(module: str, name: str) -> Any:
    """The allowed global (module, name), from numpy's current module whichever was named."""
    import _codecs

    if (module, name) == ("_codecs", "encode"):
        return _codecs.encode
    if module == "numpy":
        return {"ndarray": np.ndarray, "dtype": np.dtype}[name]
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    return numeric._frombuffer if name == "_frombuffer" else getattr(multiarray, name)


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        key = (module.replace("numpy._core", "numpy.core"), name)
        if key not in _ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name} (not an array pickle)")
        return _resolve(*key)


def read_pickle(path: Path) -> Any:
    """The plain data (dicts, lists, strings, numbers, numpy arrays) pickled in ``path``;
    ``pickle.UnpicklingError`` for a file that names anything else. Nothing it names is run."""
    data = path.read_bytes()
    return _ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()


def _field(entry: dict, key: str, path: Path) -> Any:
    # Python 2 pickles read as latin-1 have str keys; encoding="bytes" would give b"data"
    if key in entry:
        return entry[key]
    raise ValueError(f"{path.name} has no '{key}'")


def _read_batch(path: Path, layout: CifarLayout) -> tuple[Tensor, Tensor]:
    """(images (N, 3, 32, 32) uint8, labels (N,) int64) of one batch file, format-checked."""
    entry = read_pickle(path)
    if not isinstance(entry, dict):
        raise ValueError(f"{path.name} holds a {type(entry).__name__}, not a dict")
    data = _field(entry, "data", path)
    labels = _field(entry, layout.label_key, path)
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2):
        raise ValueError(f"{path.name}: 'data' is not a uint8 (N, {PIXELS}) array")
    if data.shape[1] != PIXELS:
        raise ValueError(f"{path.name}: 'data' rows have {data.shape[1]} values, not {PIXELS}")
    if not isinstance(labels, list | np.ndarray) or len(labels) != len(data):
        raise ValueError(f"{path.name}: {len(data)} images but not as many labels")
    try:
        y = torch.tensor([int(v) for v in labels], dtype=torch.int64)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{path.name}: '{layout.label_key}' are not integers") from None
    if len(y) and not (int(y.min()) >= 0 and int(y.max()) < layout.num_classes):
        raise ValueError(f"{path.name}: labels outside 0..{layout.num_classes - 1}")
    x = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32).copy())
    return x, y


def _read_names(path: Path, layout: CifarLayout) -> tuple[str, ...]:
    meta = read_pickle(path)
    names = _field(meta, layout.names_key, path) if isinstance(meta, dict) else None
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise ValueError(f"{path.name}: '{layout.names_key}' is not a list of class names")
    if len(names) != layout.num_classes:
        raise ValueError(f"{path.name}: {len(names)} class names, not {layout.num_classes}")
    return tuple(names)


@dataclass(frozen=True)
class CifarArrays:
    x_train: Tensor  # (N, 3, 32, 32) uint8
    y_train: Tensor  # (N,) int64
    x_val: Tensor
    y_val: Tensor
    classes: tuple[str, ...]
    files: tuple[Path, ...]  # the batches, in order (the digest's input)


def load_cifar(name: str, root_setting: str) -> CifarArrays:
    """The train and test splits of CIFAR-10 (``name`` "cifar10") or CIFAR-100 under
    ``data.root``; ``UserError`` naming the folder or file when they are missing or are not the
    format (including a pickle that names code to run: refused, never run)."""
    layout = LAYOUTS[name]
    root = Path(root_setting).expanduser()
    folder = root / layout.folder
    names = [*layout.train, layout.test, layout.meta]
    short = "data_batch_1..5, test_batch, batches.meta" if name == "cifar10" else ", ".join(names)
    where = f"expected {folder}/{{{short}}}"
    if not root.is_dir():
        raise UserError(f"data.root: {root_setting} is not a directory ({where})")
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise UserError(
            f"data.root: {root_setting} has no {layout.title} in torchvision's format "
            f"({where}; missing {', '.join(missing) if len(missing) < len(names) else 'all'})"
        )
    path = folder / layout.meta
    try:
        classes = _read_names(path, layout)
        parts = []
        for n in layout.train:
            path = folder / n
            parts.append(_read_batch(path, layout))
        path = folder / layout.test
        x_val, y_val = _read_batch(path, layout)
    except (OSError, EOFError, ValueError, TypeError, KeyError, IndexError, MemoryError,
            pickle.UnpicklingError) as e:  # fmt: skip
        why = first_line(e)
        raise UserError(
            f"data.root: {path} is not {layout.title} in torchvision's pickle format ({why})"
        ) from None
    return CifarArrays(
        x_train=torch.cat([x for x, _ in parts]),
        y_train=torch.cat([y for _, y in parts]),
        x_val=x_val,
        y_val=y_val,
        classes=classes,
        files=tuple(folder / n for n in [*layout.train, layout.test]),
    )
