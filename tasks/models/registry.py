"""The model registry: versioned models with aliases, status and lineage, on a local folder or S3.

Layout under the root (any fsspec URL; default $A2K_HOME/models):
    <name>/<N>/.claim                 created exclusively: whoever creates it owns version N
    <name>/<N>/model.json             the entry (written last: a version without it is incomplete)
    <name>/<N>/weights.safetensors    (or a TorchScript / torch.export file), splits/, evaluations/
    <name>/_events/<seq>.json         append-only log of alias moves and status changes

Both version numbers and events are claimed with one primitive, an exclusive create (O_EXCL on disk,
a conditional PUT on S3), so racing writers never share a number and no registration or alias move is
lost. The current aliases and statuses are a fold over the event log, which also keeps their history.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tasks.home import a2k_home, registry_url
from tasks.models.card import ENTRY_FILE, ModelEntry, Status, check_model_name, read_entry, verify_weights
from tasks.storage import create_exclusive, dumps, filesystem, full_url, is_local, listdir_names, read_json, write_atomic

SCHEME = "models:/"
DEFAULT_ALIAS = "production"  # what a bare model NAME means: models:/NAME@production
EVENTS_DIR = "_events"
CLAIM_FILE = ".claim"
_ALIAS_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
_REF_PATTERN = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/@]+)|@(?P<alias>[^/@]+))?$")
_MAX_CLAIM_ATTEMPTS = 1000


def check_alias(alias: str) -> str:
    if not _ALIAS_PATTERN.match(alias) or alias == "latest":
        raise ValueError(
            f"alias {alias!r} is not allowed; use 1-64 lower-case letters, digits, '_' or '-', starting with a letter "
            "(and not 'latest', which means the newest ready version)"
        )
    return alias


@dataclass(frozen=True)
class ModelRef:
    """`models:/NAME/VERSION`, `models:/NAME@ALIAS` or `models:/NAME/latest` (also written `models:/NAME`)."""

    name: str
    version: int | None = None
    alias: str | None = None

    def __post_init__(self) -> None:
        check_model_name(self.name)
        if self.alias is not None:
            check_alias(self.alias)
        if self.version is not None and self.version < 1:
            raise ValueError(f"version {self.version!r} must be a positive whole number")

    @classmethod
    def parse(cls, text: str) -> "ModelRef":
        m = _REF_PATTERN.match(text)
        if not m:
            raise ValueError(f"model reference {text!r} is not models:/NAME/VERSION, models:/NAME@ALIAS or models:/NAME/latest")
        version = m["version"]
        if version is None or version == "latest":
            return cls(m["name"], alias=m["alias"])
        if not version.isdigit():
            raise ValueError(f"version {version!r} in {text!r} must be a positive whole number or 'latest'")
        return cls(m["name"], version=int(version))

    def __str__(self) -> str:
        if self.version is not None:
            return f"{SCHEME}{self.name}/{self.version}"
        return f"{SCHEME}{self.name}@{self.alias}" if self.alias else f"{SCHEME}{self.name}/latest"


def as_model_ref(text: str | ModelRef) -> ModelRef:
    """What a user typed for a registered model: a `models:/` reference, or a bare NAME for `models:/NAME@production`."""
    if isinstance(text, ModelRef):
        return text
    if text.startswith(SCHEME):
        return ModelRef.parse(text)
    try:
        return ModelRef(check_model_name(text), alias=DEFAULT_ALIAS)
    except ValueError:
        raise ValueError(f"model reference {text!r} is not models:/NAME/VERSION, models:/NAME@ALIAS, models:/NAME/latest "
                         f"or a bare NAME (for models:/NAME@{DEFAULT_ALIAS})") from None


@dataclass(frozen=True)
class ModelVersion:
    """One registered version as the registry sees it now: its entry, where it lives, status and aliases."""

    entry: ModelEntry
    url: str
    status: Status
    status_reason: str
    aliases: tuple[str, ...] = ()

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.entry.name, version=int(self.entry.version))

    def to_dict(self) -> dict[str, Any]:
        return {"ref": str(self.ref), "url": self.url, "status": self.status.value, "status_reason": self.status_reason,
                "aliases": list(self.aliases), "entry": self.entry.to_dict()}


@dataclass
class _State:
    """The fold of a model's event log."""

    aliases: dict[str, int] = field(default_factory=dict)
    alias_history: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    status: dict[int, tuple[Status, str]] = field(default_factory=dict)


class Registry:
    """A registry root. The module-level functions below are the API; this holds the filesystem."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.url = str(root or registry_url())
        self.fs, self.root = filesystem(self.url)

    def _path(self, *parts: object) -> str:
        return "/".join([self.root, *map(str, parts)])

    def names(self) -> list[str]:
        return [n for n in listdir_names(self.fs, self.root) if not n.startswith((".", "_"))]

    def versions(self, name: str) -> list[int]:
        """Complete versions (with a model.json), ascending."""
        check_model_name(name)
        numbers = sorted(int(n) for n in listdir_names(self.fs, self._path(name)) if n.isdigit())
        return [v for v in numbers if self.fs.exists(self._path(name, v, ENTRY_FILE))]

    def claim_version(self, name: str) -> int:
        """The next free version number, owned by this caller from now on."""
        taken = [int(n) for n in listdir_names(self.fs, self._path(check_model_name(name))) if n.isdigit()]
        candidate = max(taken, default=0) + 1
        for _ in range(_MAX_CLAIM_ATTEMPTS):
            if create_exclusive(self.fs, self._path(name, candidate, CLAIM_FILE), dumps(_stamp())):
                return candidate
            candidate += 1
        raise RuntimeError(f"could not claim a version of {name!r} after {_MAX_CLAIM_ATTEMPTS} attempts")

    def events(self, name: str) -> list[dict[str, Any]]:
        folder = self._path(name, EVENTS_DIR)
        return [read_json(self.fs, f"{folder}/{n}") for n in listdir_names(self.fs, folder) if n.endswith(".json")]

    def append_event(self, name: str, event: dict[str, Any]) -> int:
        """Append to the model's log under the next free sequence number; racing writers each get their own."""
        folder = self._path(name, EVENTS_DIR)
        for _ in range(_MAX_CLAIM_ATTEMPTS):
            seq = max((int(n[:-5]) for n in listdir_names(self.fs, folder) if n.endswith(".json")), default=0) + 1
            if create_exclusive(self.fs, f"{folder}/{seq:08d}.json", dumps({**event, "seq": seq, **_stamp()})):
                return seq
        raise RuntimeError(f"could not append to the event log of {name!r} after {_MAX_CLAIM_ATTEMPTS} attempts")

    def state(self, name: str) -> _State:
        state = _State()
        for event in self.events(name):
            kind = event["type"]
            if kind == "alias_set":
                state.aliases[event["alias"]] = event["version"]
                state.alias_history.setdefault(event["alias"], []).append(event)
            elif kind == "alias_deleted":
                state.aliases.pop(event["alias"], None)
                state.alias_history.setdefault(event["alias"], []).append(event)
            elif kind == "status":
                state.status[event["version"]] = (Status(event["status"]), event.get("reason", ""))
        return state

    def entry(self, name: str, version: int) -> ModelEntry:
        path = self._path(name, version, ENTRY_FILE)
        if not self.fs.exists(path):
            known = ", ".join(map(str, self.versions(name))) or "none"
            raise FileNotFoundError(f"model {name!r} has no version {version}; versions: {known}")
        return ModelEntry.from_dict(read_json(self.fs, path))

    def version_info(self, name: str, version: int, state: _State | None = None) -> ModelVersion:
        entry = self.entry(name, version)
        state = state or self.state(name)
        status, reason = state.status.get(version, (entry.status, entry.status_reason))
        aliases = tuple(sorted(a for a, v in state.aliases.items() if v == version))
        return ModelVersion(entry, full_url(self.fs, self._path(name, version)), status, reason, aliases)


def _stamp() -> dict[str, str]:
    return {"at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "by": f"{os.getpid()}@{uuid.uuid4().hex[:8]}"}


# --- the API -------------------------------------------------------------------------------------


def register_model(
    staging_dir: str | os.PathLike, name: str | None = None, registry: str | None = None,
    status: Status = Status.READY, reason: str = "",
) -> ModelVersion:
    """Register the model directory `staging_dir` as the next version of `name` (default: the entry's name).

    Files are copied first and model.json last, so a version is either complete or invisible.
    """
    reg = Registry(registry)
    staged = read_entry(staging_dir)
    verify_weights(staging_dir, staged)
    name = check_model_name(name or staged.name)
    version = reg.claim_version(name)
    entry = replace(staged, name=name, version=str(version), status=Status(status), status_reason=reason)
    target = reg._path(name, version)
    for path in sorted(Path(staging_dir).rglob("*")):
        rel = path.relative_to(staging_dir).as_posix()
        if path.is_file() and rel != ENTRY_FILE and not path.name.startswith("."):
            reg.fs.makedirs(reg.fs._parent(f"{target}/{rel}"), exist_ok=True)
            reg.fs.put_file(str(path), f"{target}/{rel}")
    write_atomic(reg.fs, f"{target}/{ENTRY_FILE}", dumps(entry.to_dict()))
    return reg.version_info(name, version)


def get_model(ref: str | ModelRef, registry: str | None = None) -> ModelVersion:
    """Resolve a reference (or a bare NAME, see `as_model_ref`) to one concrete version (aliases and `latest` are
    resolved here, once)."""
    ref = as_model_ref(ref)
    reg = Registry(registry)
    versions = reg.versions(ref.name)
    if not versions:
        raise FileNotFoundError(f"model {ref.name!r} is not in the registry {reg.url!r}; models: {', '.join(reg.names()) or 'none'}")
    state = reg.state(ref.name)
    if ref.version is not None:
        return reg.version_info(ref.name, ref.version, state)
    if ref.alias is not None:
        if ref.alias not in state.aliases:
            known = ", ".join(f"{a} -> {v}" for a, v in sorted(state.aliases.items())) or "none"
            raise FileNotFoundError(
                f"model {ref.name!r} has no alias {ref.alias!r}; aliases: {known}; "
                f"set one with: a2k models promote models:/{ref.name}/VERSION --alias {ref.alias}"
            )
        return reg.version_info(ref.name, state.aliases[ref.alias], state)
    for version in reversed(versions):
        info = reg.version_info(ref.name, version, state)
        if info.status is Status.READY:
            return info
    raise FileNotFoundError(f"model {ref.name!r} has no ready version (versions: {', '.join(map(str, versions))})")


def list_models(registry: str | None = None, name: str | None = None) -> list[ModelVersion]:
    """Every complete version, by name then version."""
    reg = Registry(registry)
    out = []
    for model in [check_model_name(name)] if name else reg.names():
        state = reg.state(model)
        out += [reg.version_info(model, v, state) for v in reg.versions(model)]
    return out


def set_alias(name: str, alias: str, version: int, registry: str | None = None) -> ModelVersion:
    """Point `alias` at `version` (a ready one); the previous target stays in the alias history."""
    reg = Registry(registry)
    info = reg.version_info(check_model_name(name), version)
    if info.status is not Status.READY:
        raise ValueError(f"model {name} version {version} is {info.status.value} ({info.status_reason}); "
                         "only a ready version can carry an alias")
    reg.append_event(name, {"type": "alias_set", "alias": check_alias(alias), "version": version})
    return reg.version_info(name, version)


def delete_alias(name: str, alias: str, registry: str | None = None) -> None:
    reg = Registry(registry)
    if check_alias(alias) not in reg.state(check_model_name(name)).aliases:
        raise FileNotFoundError(f"model {name!r} has no alias {alias!r}")
    reg.append_event(name, {"type": "alias_deleted", "alias": alias})


def alias_history(name: str, alias: str, registry: str | None = None) -> list[dict[str, Any]]:
    """Every move of `alias`, oldest first."""
    return Registry(registry).state(check_model_name(name)).alias_history.get(check_alias(alias), [])


def rollback_alias(name: str, alias: str, registry: str | None = None) -> ModelVersion:
    """Point `alias` back at the version it pointed to before its current one (undoes the last move)."""
    reg = Registry(registry)
    state = reg.state(check_model_name(name))
    current = state.aliases.get(check_alias(alias))
    targets = [e.get("version") for e in state.alias_history.get(alias, [])]
    if current is None or len(targets) < 2:
        raise ValueError(f"alias {alias!r} of model {name!r} has no earlier target to roll back to")
    previous = targets[-2]
    if previous is None:
        raise ValueError(f"alias {alias!r} of model {name!r} did not exist before its current target")
    return set_alias(name, alias, previous, registry)


def set_status(name: str, version: int, status: Status, reason: str, registry: str | None = None) -> ModelVersion:
    reg = Registry(registry)
    reg.entry(check_model_name(name), version)
    reg.append_event(name, {"type": "status", "version": version, "status": Status(status).value, "reason": reason})
    return reg.version_info(name, version)


def archive(name: str, version: int, reason: str = "", registry: str | None = None) -> ModelVersion:
    """Retire a version: it keeps its files and history but no longer resolves as `latest` or carries aliases."""
    reg = Registry(registry)
    carried = [a for a, v in reg.state(check_model_name(name)).aliases.items() if v == version]
    if carried:
        raise ValueError(f"model {name} version {version} carries alias(es) {', '.join(carried)}; move them first")
    return set_status(name, version, Status.ARCHIVED, reason or "archived", registry)


def lineage(ref: str | ModelRef, registry: str | None = None) -> list[ModelVersion]:
    """The version and its ancestors, back to the root (each entry's lineage names its parent reference)."""
    chain = [get_model(ref, registry)]
    while parent := chain[-1].entry.lineage.get("parent"):
        if len(chain) > 100:
            raise RuntimeError(f"lineage of {ref} is longer than 100 versions: a cycle?")
        chain.append(get_model(parent, registry))
    return chain


def write_version_file(info: ModelVersion, rel_path: str, data: bytes, registry: str | None = None) -> str:
    """Add a file under a version (e.g. an evaluation); refused if it exists, so results are never overwritten."""
    reg = Registry(registry)
    if rel_path.startswith(("/", ".")) or ".." in rel_path.split("/") or rel_path == ENTRY_FILE:
        raise ValueError(f"path {rel_path!r} must stay inside the version folder and not replace {ENTRY_FILE}")
    path = reg._path(info.entry.name, info.entry.version, rel_path)
    if not create_exclusive(reg.fs, path, data):
        raise FileExistsError(f"{path} already exists")
    return full_url(reg.fs, path)


def list_evaluations(info: ModelVersion, registry: str | None = None) -> list[dict[str, Any]]:
    """The evaluations stored with a version (oldest first): model, dataset, run id, top-1, top-5, images."""
    reg = Registry(registry)
    folder = reg._path(info.entry.name, info.entry.version, "evaluations")
    out = []
    for run in listdir_names(reg.fs, folder):
        path = f"{folder}/{run}/evaluation.json"
        if reg.fs.exists(path):
            doc = read_json(reg.fs, path)
            ev = doc.get("evaluation", {})
            out.append({"run_id": doc.get("run_id", run), "dataset": doc.get("dataset"), "top1": ev.get("top1"),
                        "top5": ev.get("top5"), "images": ev.get("images"), "at": doc.get("at"),
                        "url": full_url(reg.fs, path)})
    return sorted(out, key=lambda e: e.get("at") or "")


def fetch_model(info: ModelVersion, registry: str | None = None) -> Path:
    """A local folder holding the version, its weights' digest checked: the version folder itself for a
    local registry, else a cache under $A2K_HOME/cache keyed by name, version and the weights' sha256."""
    reg = Registry(registry)
    source = reg._path(info.entry.name, info.entry.version)
    if is_local(reg.fs):
        _check_inside_registry(reg, source, info)
        return Path(source)  # load_model checks the digest (and that the weights are no link out) when it reads them
    cache = a2k_home() / "cache" / "models" / info.entry.name / f"{info.entry.version}-{info.entry.weights_sha256[:16]}"
    if (cache / ENTRY_FILE).exists():
        verify_weights(cache, read_entry(cache))
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".fetch-"))
    try:
        for name in (info.entry.weights_file, ENTRY_FILE):
            reg.fs.get_file(f"{source}/{name}", str(tmp / name))
        verify_weights(tmp, read_entry(tmp))
        try:
            os.rename(tmp, cache)
        except OSError:  # another process fetched it first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cache


def _check_inside_registry(reg: Registry, source: str, info: ModelVersion) -> None:
    """Refuse a version folder or model.json that resolves (through a link) outside the local registry's root."""
    root = os.path.realpath(reg.root)
    for path in (source, f"{source}/{ENTRY_FILE}"):
        real = os.path.realpath(path)
        if os.path.commonpath([root, real]) != root:
            raise ValueError(f"{info.ref}: {path!r} resolves to {real!r}, outside the registry {root!r}; "
                             "a registry's versions must lie in it (links out are refused)")


def resolve_model(model: str, registry: str | None = None) -> tuple[ModelVersion | None, Path]:
    """What a flow's `model` parameter names: a `models:/` reference, a bare NAME (its @production), or a
    local model directory. Returns the registry version (None for a bare directory) and a local folder."""
    if not model.startswith(SCHEME):
        path = Path(model).expanduser()
        if (path / ENTRY_FILE).is_file():
            return None, path
        if "/" in model or os.sep in model:
            raise FileNotFoundError(f"model {model!r} is neither a model directory nor a models:/ reference")
    info = get_model(as_model_ref(model), registry)
    return info, fetch_model(info, registry)


def nearest_split_urls(info: ModelVersion, registry: str | None = None,
                       required: tuple[str, ...] | None = None) -> dict[str, str] | None:
    """URLs of the split manifests recorded with `info` or, failing that, its nearest ancestor (a compressed model
    keeps its parent's): the `required` splits (every recorded one when None), each present in the store; None
    when no version of the lineage has them."""
    current = info
    for _ in range(100):
        manifests = current.entry.lineage.get("split", {}).get("manifests", {})
        urls = {s: f"{current.url}/{m}" for s, m in manifests.items() if required is None or s in required}
        complete = urls and (required is None or set(required) <= urls.keys())
        if complete and all(filesystem(u)[0].exists(filesystem(u)[1]) for u in urls.values()):
            return urls
        parent = current.entry.lineage.get("parent")
        if not parent:
            return None
        current = get_model(parent, registry)
    return None


def recorded_test_split(info: ModelVersion, registry: str | None = None) -> str:
    """The version's own test split, or the nearest ancestor's (a compressed model keeps its parent's)."""
    urls = nearest_split_urls(info, registry, required=("test",))
    if urls is None:
        raise ValueError(f"{info.ref} has no recorded test split (nor has an ancestor); give a labelled dataset to evaluate on")
    return urls["test"]
