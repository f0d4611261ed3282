"""Classes named as users name them: ``--class square`` or ``forget_split(task, classes=["square"])`` for an id."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from genunlearn.errors import UserError


def class_ids(tokens: Sequence[int | str], names: Sequence[str] | None, what: str = "class") -> list[int]:
    """The ids of ``tokens``: an int or a digit string is an id; any other string is looked up in ``names`` (the
    label order). A UserError listing the names for one that is not there, or when no names are known."""
    ids = []
    for token in tokens:
        if isinstance(token, int) or str(token).isdigit():
            ids.append(int(token))
            continue
        if not names:
            raise UserError(f"{what} {token!r} is not an id and the {what} names are unknown here; pass its id")
        if token not in names:
            shown = ", ".join(list(names)[:12]) + (", ..." if len(names) > 12 else "")
            raise UserError(f"no {what} named {token!r}; the {what}es are {shown} (or pass an id)")
        ids.append(list(names).index(token))
    return ids


def held_class_names(model: str, pretrained: str | None, data: str | None, *, subclasses: bool = False) -> list[str] | None:
    """The label names a run will see, read without loading anything heavy: ``data``'s class folders (its
    super-classes when it has ``superclasses.json``, unless ``subclasses``), else the model folder's own
    (a timm config's ``label_names``, a pipeline's ``id2label``), else None."""
    from genunlearn.data.folders import folder_class_names

    if data is not None:
        root = Path(data)
        grouping = root / "superclasses.json"
        if grouping.is_file() and not subclasses:
            return list(json.loads(grouping.read_text(encoding="utf-8")))
        return folder_class_names(root) if (root / "train").is_dir() else None
    for folder in (Path(p) for p in (pretrained, model) if p is not None):
        names = _folder_label_names(folder)
        if names is not None:
            return names
    return None


def _folder_label_names(folder: Path) -> list[str] | None:
    for config in (folder / "config.json", folder / "model_index.json"):
        if not config.is_file():
            continue
        try:
            values = json.loads(config.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        if isinstance(values.get("label_names"), list):
            return [str(n) for n in values["label_names"]]
        if isinstance(values.get("id2label"), dict):
            table = values["id2label"]
            return [str(table.get(str(i), i)).split(",")[0].strip() for i in range(len(table))]
    return None
