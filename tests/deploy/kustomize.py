"""A small, strict subset of ``kustomize build``, enough to render k8s/ in the tests.

kustomize itself is a Go binary that no Python package ships, so the tests render the
overlays with this subset instead. It implements only what k8s/ uses, with kustomize's
semantics, and refuses everything else (so a kustomization that grows a feature this subset
lacks fails the tests instead of rendering wrongly):

- ``resources``: YAML files (multi-document) and directories holding a kustomization;
- ``components``: directories holding a ``kind: Component`` kustomization, applied after the
  including kustomization's resources and before its own patches and images;
- ``patches``: ``path`` to a JSON patch (RFC 6902, operations add/remove/replace/test)
  with a ``target`` of ``kind`` and ``name``; a target that matches nothing is an error;
- ``images``: ``name`` -> ``newName`` / ``newTag`` on the containers of pod templates.

Objects with the same kind, namespace and name are an error, as in kustomize.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "components", "patches", "images"}
PATCH_OPS = {"add", "remove", "replace", "test"}


class KustomizeError(Exception):
    """The kustomization is wrong, or uses something this subset does not implement."""


def build(directory: Path) -> list[Obj]:
    """Render the kustomization in ``directory`` (like ``kustomize build DIRECTORY``)."""
    return _render(directory.resolve(), expect_kind="Kustomization")


def _load_kustomization(directory: Path, expect_kind: str) -> Obj:
    path = directory / "kustomization.yaml"
    if not path.is_file():
        raise KustomizeError(f"{directory} has no kustomization.yaml")
    doc = yaml.safe_load(path.read_text())
    kind = doc.get("kind", "Kustomization")
    if kind != expect_kind:
        raise KustomizeError(f"{path}: kind {kind}, expected {expect_kind}")
    unknown = set(doc) - KUSTOMIZATION_KEYS
    if unknown:
        raise KustomizeError(f"{path}: this kustomize subset does not implement {sorted(unknown)}")
    return dict(doc)


def _render(directory: Path, expect_kind: str, base: list[Obj] | None = None) -> list[Obj]:
    k = _load_kustomization(directory, expect_kind)
    objects: list[Obj] = list(base or [])
    for entry in k.get("resources", []):
        objects.extend(_load_resource(directory / entry))
    for entry in k.get("components", []):
        objects = _render((directory / entry).resolve(), "Component", base=objects)
    _check_unique(objects, directory)
    for patch in k.get("patches", []):
        _apply_patch(objects, directory, patch)
    for image in k.get("images", []):
        _set_image(objects, image)
    return objects


def _load_resource(path: Path) -> list[Obj]:
    if path.is_dir():
        return _render(path.resolve(), "Kustomization")
    if not path.is_file():
        raise KustomizeError(f"resource {path} does not exist")
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def object_id(obj: Obj) -> tuple[str, str, str]:
    """kustomize's identity of an object: kind, namespace, name."""
    meta = obj.get("metadata") or {}
    return (str(obj.get("kind")), str(meta.get("namespace", "")), str(meta.get("name")))


def _check_unique(objects: list[Obj], directory: Path) -> None:
    seen: set[tuple[str, str, str]] = set()
    for obj in objects:
        key = object_id(obj)
        if key in seen:
            raise KustomizeError(f"{directory}: {key} is declared twice")
        seen.add(key)


def _apply_patch(objects: list[Obj], directory: Path, patch: Obj) -> None:
    if set(patch) != {"path", "target"} or set(patch["target"]) - {"kind", "name"}:
        raise KustomizeError(
            f"{directory}: only patches with `path` and a kind/name `target` are implemented"
        )
    ops = yaml.safe_load((directory / patch["path"]).read_text())
    if not isinstance(ops, list):
        raise KustomizeError(f"{patch['path']}: only JSON patches (a list of operations) are implemented")
    target = patch["target"]
    matched = [
        o
        for o in objects
        if o.get("kind") == target.get("kind", o.get("kind"))
        and o["metadata"]["name"] == target.get("name", o["metadata"]["name"])
    ]
    if not matched:
        raise KustomizeError(f"{directory}: patch {patch['path']} matches no object ({target})")
    for obj in matched:
        for op in ops:
            json_patch(obj, op)


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise KustomizeError(f"JSON pointer {path!r} must start with '/'")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def json_patch(doc: Obj, op: Obj) -> None:
    """Apply one RFC 6902 operation (add, remove, replace, test) to ``doc`` in place."""
    kind = op.get("op")
    if kind not in PATCH_OPS:
        raise KustomizeError(f"JSON patch op {kind!r} is not implemented")
    *parents, last = _pointer(op["path"])
    node: Any = doc
    for part in parents:
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, ValueError) as exc:
            raise KustomizeError(f"{op}: path does not exist") from exc
    value = copy.deepcopy(op.get("value"))
    if isinstance(node, list):
        index = len(node) if (kind == "add" and last == "-") else int(last)
        if kind == "add":
            if not 0 <= index <= len(node):
                raise KustomizeError(f"{op}: index out of range")
            node.insert(index, value)
            return
        if not 0 <= index < len(node):
            raise KustomizeError(f"{op}: index out of range")
        if kind == "test":
            if node[index] != value:
                raise KustomizeError(f"{op}: test failed, found {node[index]!r}")
        elif kind == "remove":
            del node[index]
        else:
            node[index] = value
        return
    if not isinstance(node, dict):
        raise KustomizeError(f"{op}: parent is not an object or array")
    if kind == "add":
        node[last] = value
        return
    if last not in node:
        raise KustomizeError(f"{op}: path does not exist")
    if kind == "test":
        if node[last] != value:
            raise KustomizeError(f"{op}: test failed, found {node[last]!r}")
    elif kind == "remove":
        del node[last]
    else:
        node[last] = value


def _set_image(objects: list[Obj], image: Obj) -> None:
    if set(image) - {"name", "newName", "newTag"}:
        raise KustomizeError(f"images: only name/newName/newTag are implemented, got {sorted(image)}")
    for obj in objects:
        template = (obj.get("spec") or {}).get("template") or {}
        pod = template.get("spec") or {}
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            name, _, tag = container["image"].partition(":")
            if name != image["name"]:
                continue
            new_tag = image.get("newTag", tag)
            container["image"] = image.get("newName", name) + (f":{new_tag}" if new_tag else "")
