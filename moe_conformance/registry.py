"""Finding arch plugins: the built-in archs/ folder, the ``moe_conformance.archs`` entry-point
group, and ``--arch-plugin path/or.module``.

Discovery is lazy: listing names imports nothing; a plugin is imported only when its arch is
selected. A plugin that fails to import becomes an entry carrying the error, which the pytest
plugin turns into one errored case per selected arch, never a silent absence.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import os
import traceback
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path

from .paths import archs_dir
from .spec import ArchSpec, SpecError, validate

ENTRY_POINT_GROUP = "moe_conformance.archs"


@dataclass
class ArchEntry:
    """One discoverable architecture. ``load()`` imports its plugin on first use."""

    name: str
    origin: str  # where it came from, for messages: a path, an entry point, a module
    _loader: object = field(repr=False, default=None)
    _spec: ArchSpec | None = field(default=None, repr=False)
    error: str | None = None
    source_file: Path | None = None  # the plugin's file: schema snapshots live beside it

    @property
    def snapshot_dir(self) -> Path:
        base = self.source_file.parent if self.source_file else Path.cwd()
        return base / "__snapshots__" / self.name

    def load(self) -> ArchSpec:
        if self._spec is None and self.error is None:
            try:
                loaded = self._loader()
                self.source_file = _file_of(loaded)
                specs = _specs_of(loaded, self.origin)
                matching = [s for s in specs if s.name == self.name] or specs
                self._spec = matching[0]
            except Exception as exc:  # noqa: BLE001 - any plugin failure becomes an errored case
                self.error = _describe_failure(exc, self.origin)
        if self.error is not None:
            raise PluginLoadError(self.error)
        return self._spec


class PluginLoadError(RuntimeError):
    pass


def _describe_failure(exc: BaseException, origin: str) -> str:
    if isinstance(exc, SpecError):
        return str(exc)
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-3))
    return f"arch plugin {origin} failed to import: {type(exc).__name__}: {exc}\n{tb}"


def _file_of(obj: object) -> Path | None:
    if isinstance(obj, ArchSpec):
        obj = sys.modules.get(getattr(obj.candidate, "__module__", ""), None)
    file = getattr(obj, "__file__", None)
    return Path(file) if file else None


def _specs_of(obj: object, origin: str) -> list[ArchSpec]:
    """A module (with ARCH or ARCHS) or an ArchSpec object -> validated specs."""
    if isinstance(obj, ArchSpec):
        return [validate(obj, origin)]
    if hasattr(obj, "ARCHS"):
        specs = list(obj.ARCHS) if isinstance(obj.ARCHS, (list, tuple)) else None
        if not specs:
            raise SpecError(f"arch plugin {origin}: ARCHS must be a non-empty list of ArchSpec, got {obj.ARCHS!r}")
        names = [getattr(s, "name", None) for s in specs]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise SpecError(f"arch plugin {origin}: ARCHS declares {', '.join(twice)} more than once")
        return [validate(s, origin) for s in specs]
    if hasattr(obj, "ARCH"):
        return [validate(obj.ARCH, origin)]
    raise SpecError(f"arch plugin {origin}: defines neither ARCH nor ARCHS")


def _import_path(path: Path, importable_folder: bool = False):
    # the module name carries the path's hash: two plugin files with one basename both load
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    module_name = f"moe_conformance_plugin_{path.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    # like a script: the plugin's own folder is importable, so it can import its sibling modules
    folder = str(path.resolve().parent)
    if importable_folder and folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def builtin_entries() -> list[ArchEntry]:
    return [
        ArchEntry(name=p.stem, origin=str(p), _loader=lambda p=p: _import_path(p))
        for p in sorted(archs_dir().glob("*.py"))
        if not p.name.startswith("_")
    ]


def entry_point_entries() -> list[ArchEntry]:
    return [
        ArchEntry(name=ep.name, origin=f"entry point {ep.name} = {ep.value}", _loader=ep.load)
        for ep in entry_points(group=ENTRY_POINT_GROUP)
    ]


def plugin_arg_entries(plugin_args: list[str]) -> list[ArchEntry]:
    """``--arch-plugin`` values: a .py path or an importable module. Their arch names are known
    only after import, so these are imported now (an import error keeps the file's stem)."""
    entries = []
    for arg in plugin_args:
        path = Path(arg)
        looks_like_path = arg.endswith(".py") or os.sep in arg or "/" in arg
        if path.is_dir():
            raise PluginArgumentError(f"--arch-plugin {arg}: is a directory; give a plugin .py file or an importable module")
        if looks_like_path and not path.exists():
            raise PluginArgumentError(f"--arch-plugin {arg}: no such file")
        if path.exists():
            origin, loader, fallback = str(path), (lambda path=path: _import_path(path.resolve(), True)), path.stem
        elif all(part.isidentifier() for part in arg.split(".")):
            origin, loader, fallback = f"module {arg}", (lambda arg=arg: importlib.import_module(arg)), arg.rsplit(".", 1)[-1]
        else:
            raise PluginArgumentError(f"--arch-plugin {arg!r}: neither a .py file nor an importable module name")
        try:
            loaded = loader()
            specs = _specs_of(loaded, origin)
        except Exception as exc:  # noqa: BLE001
            entries.append(ArchEntry(name=fallback, origin=origin, error=_describe_failure(exc, origin)))
            continue
        entries.extend(ArchEntry(name=s.name, origin=origin, _spec=s, source_file=_file_of(loaded)) for s in specs)
    return entries


def discover(plugin_args: list[str] = ()) -> tuple[dict[str, ArchEntry], list[str]]:
    """All known archs by name, and the names that --arch-plugin brought. Two sources that
    declare one arch name are an error naming both (a broken plugin must never be shadowed
    silently by a working one, or the reverse)."""
    from_args = plugin_arg_entries(list(plugin_args))
    found: dict[str, ArchEntry] = {}
    clashes = []
    for entry in builtin_entries() + entry_point_entries() + from_args:
        seen = found.get(entry.name)
        if seen is not None and not _same_source(seen, entry):
            clashes.append(f"arch {entry.name!r} is declared by both {seen.origin} and {entry.origin}")
            continue
        found[entry.name] = entry
    if clashes:
        raise DuplicateArch("; ".join(clashes) + " (rename one: ArchSpec(name=...))")
    return found, [e.name for e in from_args]


def _same_source(a: ArchEntry, b: ArchEntry) -> bool:
    try:
        return Path(a.origin).resolve() == Path(b.origin).resolve()
    except OSError:
        return a.origin == b.origin


def select(known: dict[str, ArchEntry], arch_option: str | None, plugin_names: list[str]) -> list[ArchEntry]:
    """Resolve ``--arch`` (a name, ``a,b`` or ``all``). Without --arch, the archs that
    --arch-plugin brought are selected."""
    if not arch_option:
        return [known[n] for n in dict.fromkeys(plugin_names)]
    if arch_option.strip() == "all":
        return list(known.values())
    names = [n.strip() for n in arch_option.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UnknownArch(
            f"unknown arch {', '.join(map(repr, unknown))}; known archs: {', '.join(sorted(known)) or '(none)'}"
        )
    return [known[n] for n in names]


class UnknownArch(LookupError):
    pass


class DuplicateArch(ValueError):
    pass


class PluginArgumentError(ValueError):
    pass
