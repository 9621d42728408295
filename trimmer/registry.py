"""The allowlist registry: sources -> one consolidated, immutable snapshot.

Each source (bundle file, repository, static map) keeps its last good data.
Any change rebuilds a new Snapshot and swaps one reference, so readers never
see a half-built map and the read path takes no lock. A source that fails to
reload keeps its last good data; the failure shows in `status()` and counters.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from .bundle import read_bundle
from .errors import ConfigError, TrimmerError
from .handshake import input_digest
from .overrides import Overrides, load_overrides
from .repository import scan_repository
from .names import version_key
from .signature import Signature

log = logging.getLogger("trimmer.registry")

Key = tuple[str, str]


@dataclass
class SourceData:
    signatures: dict[Key, Signature] = field(default_factory=dict)
    default_versions: dict[str, str] = field(default_factory=dict)
    errors: dict[Key, str] = field(default_factory=dict)  # per-version failures; last good kept
    # Models served without versions (OIP metadata listing `"versions": []`, as MLServer does): one
    # signature for the whole model, used for requests that name no version; paths stay unversioned.
    unversioned: dict[str, Signature] = field(default_factory=dict)


VERSION_POLICIES = ("latest", "explicit")


class Source:
    """Something that yields signatures. Subclasses implement load()."""

    kind = "static"

    def __init__(self, name: str) -> None:
        self.name = name

    def watch_paths(self) -> list[Path]:
        return []

    def affected_by(self, path: Path) -> bool:
        return False

    def load(self) -> SourceData:
        raise NotImplementedError


class BundleSource(Source):
    kind = "bundle"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).absolute()
        super().__init__(str(self.path))

    def watch_paths(self) -> list[Path]:
        return [self.path.parent]  # the directory: an atomic rename replaces the inode

    def affected_by(self, path: Path) -> bool:
        return path == self.path

    def load(self) -> SourceData:
        signatures, defaults = read_bundle(self.path)
        return SourceData(signatures, defaults)


class RepositorySource(Source):
    kind = "repository"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).absolute()
        super().__init__(str(self.path))

    def watch_paths(self) -> list[Path]:
        return [self.path]

    def affected_by(self, path: Path) -> bool:
        return path == self.path or self.path in path.parents

    def load(self) -> SourceData:
        scan = scan_repository(self.path)
        return SourceData({k: mv.signature for k, mv in scan.versions.items()}, {}, dict(scan.errors))


class StaticSource(Source):
    """Signatures pushed by code, e.g. inputs fetched from an upstream's OIP metadata."""

    kind = "static"

    def __init__(self, name: str, signatures: Mapping[Key, Signature] | None = None) -> None:
        super().__init__(name)
        self._data = SourceData(dict(signatures or {}))

    def set(self, signatures: Mapping[Key, Signature], errors: Mapping[Key, str] | None = None) -> None:
        self._data = SourceData(dict(signatures), {}, dict(errors or {}))

    def load(self) -> SourceData:
        return self._data


def _file_identity(path: Path) -> tuple[str, int, int, int] | None:
    """What `path` resolves to now (symlinks followed): target, inode, mtime, size; None if it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return os.path.realpath(path), st.st_ino, st.st_mtime_ns, st.st_size


@dataclass(frozen=True, slots=True)
class Resolution:
    """What to do with one (model, version) request. allowlist None means: forward untrimmed."""

    model: str
    version: str | None
    allowlist: frozenset[str] | None
    mode: str
    # exact | default_version | latest_version | shared_allowlist | unversioned | model_allowlist | miss
    reason: str
    # input_digest of the signature the allowlist came from (trimmer/handshake.py): sent with trimmed
    # bodies so a leaf running another signature refuses them. None: no single signature (explicit
    # allowlist, disagreeing sources), so there is nothing a leaf could check.
    digest: str | None = None
    # Whether the root names `version` in the upstream path for a request that named none. True for a
    # configured default (the root is authoritative); False for `latest`, where the upstream's own rule
    # (its highest version) picks the same one and the handshake catches the moments they differ.
    pin: bool = True


@dataclass(frozen=True)
class Snapshot:
    generation: int
    entries: dict[Key, Resolution]
    defaults: dict[str, Resolution]  # model -> resolution for requests without a version
    fallbacks: dict[str, Resolution]  # model -> model-wide explicit allowlist
    modes: dict[str, str]
    default_mode: str
    default_versions: dict[str, str]
    conflicts: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()  # misconfigurations a user must see: shown at /admin/allowlists, logged
    rejected_allowlists: tuple[str, ...] = ()  # explicit allowlists not served: they name features no signature reads

    def resolve(self, model: str, version: str | None = None) -> Resolution:
        hit = self.entries.get((model, version)) if version is not None else self.defaults.get(model)
        if hit is not None:
            return hit
        fallback = self.fallbacks.get(model)
        if fallback is not None:
            return Resolution(model, version, fallback.allowlist, fallback.mode, "model_allowlist")
        return Resolution(model, version, None, self.modes.get(model, self.default_mode), "miss")


@dataclass
class SourceState:
    source: Source
    data: SourceData | None = None
    last_reload: float | None = None
    last_error: str | None = None
    last_error_time: float | None = None
    reloads: int = 0
    failures: int = 0


def _unknown_allowlist_features(ov: Overrides, signatures: Mapping[Key, Signature]) -> list[str]:
    """`<where>: ...` lines for explicit allowlists naming features no known signature of the model reads.

    `keep` lists are intended extras and never checked; an explicit allowlist may opt out with
    `allow_extra_features: true` (e.g. a feature read by a model the registry has no archive for)."""
    inputs: dict[str, set[str]] = {}
    for (model, _), sig in signatures.items():
        inputs.setdefault(model, set()).update(sig.input_names)
    out: list[str] = []
    for model, mo in ov.models.items():
        for version, vo in mo.versions.items():
            vsig = signatures.get((model, version))
            if vo.allowlist is not None and vsig is not None and not (
                    vo.allow_extra_features or mo.allow_extra_features):
                extra = sorted(vo.allowlist - set(vsig.input_names))
                if extra:
                    out.append(f"models.{model}.versions.{version}.allowlist: {', '.join(extra[:10])} not in the "
                               f"signature of {model}/{version} (a typo? set allow_extra_features: true to send them "
                               "anyway)")
        known = inputs.get(model)
        if mo.allowlist is not None and known and not mo.allow_extra_features:
            extra = sorted(mo.allowlist - known)
            if extra:
                out.append(f"models.{model}.allowlist: {', '.join(extra[:10])} not in any known signature of {model} "
                           f"(a typo? set allow_extra_features: true to send them anyway)")
    return out


class Registry:
    def __init__(
        self,
        sources: Iterable[Source] = (),
        overrides: Overrides | None = None,
        default_versions: Mapping[str, str] | None = None,
        version_policies: Mapping[str, str] | None = None,
        default_policy: str = "latest",
    ) -> None:
        self._states: dict[str, SourceState] = {}
        self._overrides = overrides or Overrides()
        self._config_defaults = dict(default_versions or {})
        self._policies = dict(version_policies or {})  # model -> latest | explicit
        self._default_policy = default_policy
        self._lock = threading.Lock()  # serialises writers only
        self._generation = 0
        self._overrides_path: Path | None = None
        self._overrides_state = SourceState(Source("overrides"))
        self.snapshot: Snapshot = self._build()
        for source in sources:
            self.add_source(source, reload=False)

    # ------------------------------------------------------------------ writers
    def add_source(self, source: Source, reload: bool = True) -> None:
        with self._lock:
            self._states[source.name] = SourceState(source)
        if reload:
            self.reload([source.name])

    def set_overrides(self, overrides: Overrides) -> None:
        """Swap in new overrides; an explicit allowlist naming features its model's known signature lacks
        (a typo such as `cand_ctrr`) raises ConfigError and the current overrides stay."""
        with self._lock:
            unknown = _unknown_allowlist_features(overrides, self._signatures())
            if unknown:
                raise ConfigError("allowlist overrides: " + "; ".join(unknown))
            self._overrides = overrides
            self.snapshot = self._build()

    def _signatures(self) -> dict[Key, Signature]:
        out: dict[Key, Signature] = {}
        for state in self._states.values():
            if state.data is not None:
                for key, sig in state.data.signatures.items():
                    out.setdefault(key, sig)
                for model, sig in state.data.unversioned.items():
                    out.setdefault((model, ""), sig)
        return out

    def use_overrides_file(self, path: str | os.PathLike[str]) -> None:
        """Load overrides from a YAML file now (errors raise) and hot-reload it from then on."""
        self._overrides_path = Path(path).absolute()
        self._overrides_state.source.name = str(self._overrides_path)
        self.set_overrides(load_overrides(self._overrides_path))
        self._overrides_state.data = SourceData()
        self._overrides_state.reloads += 1
        self._overrides_state.last_reload = time.time()

    def reload_overrides(self) -> bool:
        """Re-read the overrides file; a bad file keeps the last good overrides (logged, counted)."""
        if self._overrides_path is None:
            return False
        state = self._overrides_state
        try:
            self.set_overrides(load_overrides(self._overrides_path))
        except TrimmerError as exc:
            state.failures += 1
            state.last_error, state.last_error_time = str(exc), time.time()
            log.error("overrides %s failed to load (keeping last good): %s", self._overrides_path, exc)
            return False
        state.reloads += 1
        state.last_reload, state.last_error = time.time(), None
        return True

    def reload(self, names: Iterable[str] | None = None) -> Snapshot:
        """Reload the named sources (all when None) and swap in a new snapshot."""
        with self._lock:
            targets = list(self._states) if names is None else [n for n in names if n in self._states]
            for name in targets:
                self._reload_one(self._states[name])
            self.snapshot = self._build()
            return self.snapshot

    def _reload_one(self, state: SourceState) -> None:
        now = time.time()
        try:
            data = state.source.load()
        except TrimmerError as exc:
            state.failures += 1
            state.last_error, state.last_error_time = str(exc), now
            kept = "keeping last good allowlists" if state.data is not None else "no allowlists from it yet"
            log.error("allowlist source %s failed to load (%s): %s", state.source.name, kept, exc)
            return
        if data.errors:
            # Last good per version: carry over what this source had for the failing versions.
            previous = state.data.signatures if state.data else {}
            for key in data.errors:
                if key in previous:
                    data.signatures[key] = previous[key]
            state.failures += 1
            state.last_error = "; ".join(f"{m}/{v}: {e}" for (m, v), e in sorted(data.errors.items()))
            state.last_error_time = now
            log.error("allowlist source %s: %d version(s) failed to load: %s", state.source.name,
                      len(data.errors), state.last_error)
        else:
            state.last_error = None
        state.data = data
        state.reloads += 1
        state.last_reload = now

    def _build(self) -> Snapshot:
        allow: dict[Key, frozenset[str]] = {}
        digests: dict[Key, str | None] = {}
        bundle_defaults: dict[str, str] = {}
        conflicts: list[str] = []
        unversioned: dict[str, Signature] = {}
        for state in self._states.values():
            if state.data is None:
                continue
            bundle_defaults.update(state.data.default_versions)
            for model, sig in state.data.unversioned.items():
                unversioned.setdefault(model, sig)
            for key, sig in state.data.signatures.items():
                if key in allow and allow[key] != sig.allowlist:
                    # Disagreeing sources: forward the union so no model loses a feature it needs.
                    conflicts.append(f"{key[0]}/{key[1]}: sources disagree; using the union of their allowlists")
                    allow[key] = allow[key] | sig.allowlist
                    digests[key] = None
                elif key not in allow:
                    allow[key] = sig.allowlist
                    digests[key] = input_digest(sig.input_names)

        ov = self._overrides
        default_versions = {**bundle_defaults, **self._config_defaults}
        default_versions.update({m: o.default_version for m, o in ov.models.items() if o.default_version is not None})
        modes = {m: o.mode for m, o in ov.models.items() if o.mode is not None}

        def mode_of(model: str, version: str | None) -> str:
            mo = ov.models.get(model)
            vo = mo.versions.get(version) if (mo and version is not None) else None
            return (vo.mode if vo and vo.mode else None) or modes.get(model) or ov.default_mode

        def finish(model: str, version: str, base: frozenset[str], reason: str, digest: str | None) -> Resolution:
            mo = ov.models.get(model)
            vo = mo.versions.get(version) if mo else None
            extra = (mo.keep if mo else frozenset()) | (vo.keep if vo else frozenset())
            return Resolution(model, version, base | extra, mode_of(model, version), reason, digest)

        # An explicit allowlist naming features the model's signature lacks is not served (set_overrides refuses
        # it; this catches a signature that arrived after the overrides did).
        rejected = _unknown_allowlist_features(ov, self._signatures())
        problems = list(rejected)
        bad = {p.split(":", 1)[0] for p in rejected}
        for line in rejected:
            log.error("allowlist override not served: %s", line)
        entries: dict[Key, Resolution] = {}
        for key, base in allow.items():
            entries[key] = finish(key[0], key[1], base, "exact", digests.get(key))
        for model, mo in ov.models.items():
            for version, vo in mo.versions.items():
                if vo.allowlist is not None and f"models.{model}.versions.{version}.allowlist" not in bad:
                    entries[(model, version)] = finish(model, version, vo.allowlist, "exact", None)
        fallbacks = {
            m: Resolution(m, None, o.allowlist | o.keep, o.mode or ov.default_mode, "model_allowlist")
            for m, o in ov.models.items()
            if o.allowlist is not None and f"models.{m}.allowlist" not in bad
        }
        defaults: dict[str, Resolution] = {}
        for model, version in default_versions.items():
            hit = entries.get((model, version))
            if hit is not None:
                defaults[model] = Resolution(model, version, hit.allowlist, hit.mode, "default_version", hit.digest)
        # Requests without a version and no configured default: resolve as the upstream will.
        by_model: dict[str, list[str]] = {}
        for model, version in entries:
            by_model.setdefault(model, []).append(version)
        for model, versions in by_model.items():
            if model in defaults:
                continue
            policy = self._policies.get(model, self._default_policy)
            if policy == "latest":
                # The leaf's rule and Triton's default policy: the highest version ("10" > "9").
                hit = entries[(model, max(versions, key=version_key))]
                defaults[model] = Resolution(model, hit.version, hit.allowlist, hit.mode,
                                             "latest_version", hit.digest, pin=False)
                continue
            shared = {entries[(model, v)].allowlist for v in versions}
            if len(shared) == 1:
                # Whichever version the upstream runs, the trim is the same.
                hits = [entries[(model, v)] for v in versions]
                same_digest = {h.digest for h in hits}
                digest = same_digest.pop() if len(same_digest) == 1 else None
                modes_seen = {h.mode for h in hits}
                mode = modes_seen.pop() if len(modes_seen) == 1 else mode_of(model, None)
                defaults[model] = Resolution(model, None, hits[0].allowlist, mode,
                                             "shared_allowlist", digest, pin=False)
            elif len(versions) > 1:
                problems.append(f"models.{model}: version_policy explicit, versions "
                                f"{', '.join(sorted(versions, key=version_key))} "
                                "have different allowlists and no default_version: requests without a version go "
                                "untrimmed")
        for model, sig in unversioned.items():
            if model not in defaults:
                over = ov.models.get(model)
                keep = over.keep if over else frozenset()
                defaults[model] = Resolution(model, None, sig.allowlist | keep, mode_of(model, None), "unversioned",
                                             input_digest(sig.input_names), pin=False)
        self._generation += 1
        return Snapshot(
            self._generation, entries, defaults, fallbacks, modes, ov.default_mode, default_versions, tuple(conflicts),
            tuple(problems), tuple(rejected),
        )

    # ------------------------------------------------------------------ readers
    def resolve(self, model: str, version: str | None = None) -> Resolution:
        return self.snapshot.resolve(model, version)

    def status(self) -> dict:
        """JSON-ready view for the root's admin endpoint."""
        snap = self.snapshot
        models: dict[str, dict] = {}
        origin: dict[Key, str] = {}
        for st in self._states.values():
            if st.data is not None:
                for key in st.data.signatures:
                    origin.setdefault(key, st.source.name)
        for (model, version), res in sorted(snap.entries.items()):
            m = models.setdefault(model, {"default_version": snap.default_versions.get(model), "versions": {}})
            m["versions"][version] = {"allowlist_size": len(res.allowlist or ()), "mode": res.mode,
                                      "signature_digest": res.digest,
                                      "source": origin.get((model, version), "overrides"),
                                      "features": sorted(res.allowlist or ())}
        for model, res in snap.defaults.items():
            m = models.setdefault(model, {"default_version": snap.default_versions.get(model), "versions": {}})
            m["without_version"] = {"resolves_to": res.version, "reason": res.reason, "names_version_upstream": res.pin,
                                    "allowlist_size": len(res.allowlist or ()), "signature_digest": res.digest}
        for model, res in snap.fallbacks.items():
            models.setdefault(model, {"default_version": snap.default_versions.get(model), "versions": {}})[
                "model_allowlist_size"
            ] = len(res.allowlist or ())
        return {
            "generation": snap.generation,
            "default_mode": snap.default_mode,
            "conflicts": list(snap.conflicts),
            "problems": list(snap.problems) + [f"source {st.source.name}: {st.last_error}" for st in self._all_states()
                                               if st.last_error],
            "sources": [
                {
                    "name": st.source.name,
                    "kind": "overrides" if st is self._overrides_state else st.source.kind,
                    "loaded": st.data is not None,
                    "versions": len(st.data.signatures) if st.data else 0,
                    "reloads": st.reloads,
                    "failures": st.failures,
                    "last_reload_unix": st.last_reload,
                    "last_error": st.last_error,
                    "last_error_unix": st.last_error_time,
                }
                for st in self._all_states()
            ],
            "models": models,
        }

    def _watched_files(self) -> list[Path]:
        """Single files the watcher reloads: the overrides file and bundle files (repositories are directories)."""
        files = [st.source.path for st in self._states.values() if isinstance(st.source, BundleSource)]
        return files + ([self._overrides_path] if self._overrides_path is not None else [])

    def _all_states(self) -> list[SourceState]:
        return list(self._states.values()) + ([self._overrides_state] if self._overrides_path else [])

    def source_states(self) -> list[tuple[str, SourceState]]:
        """(kind, state) of every source, the overrides file included: for metrics, cheap (no snapshot walk)."""
        return [("overrides" if st is self._overrides_state else st.source.kind, st) for st in self._all_states()]

    @property
    def sources(self) -> list[SourceState]:
        return list(self._states.values())

    # ------------------------------------------------------------------ hot reload
    async def watch(self, stop_event: asyncio.Event | None = None, debounce_ms: int = 200,
                    force_polling: bool | None = None) -> None:
        """Reload affected sources whenever their files change, until stop_event is set."""
        from watchfiles import awatch

        paths = {p for st in self._states.values() for p in st.source.watch_paths() if p.exists()}
        if self._overrides_path is not None:
            paths.add(self._overrides_path.parent)
        if not paths:
            return
        loop = asyncio.get_running_loop()
        files = self._watched_files()
        seen = {f: _file_identity(f) for f in files}
        async for changes in awatch(
            *sorted(paths), debounce=debounce_ms, step=50, stop_event=stop_event, force_polling=force_polling,
            recursive=True
        ):
            changed = {Path(p).absolute() for _, p in changes}
            # Kubernetes ConfigMap volumes: `name -> ..data/name`, and kubelet updates by renaming a new
            # `..data` symlink over the old one. No event names `name` itself, so after any event in the
            # watched directories, a file also counts as changed when what it resolves to changed.
            for f in files:
                now = _file_identity(f)
                if now != seen[f]:
                    seen[f] = now
                    changed.add(f)
            names = [n for n, st in self._states.items() if any(st.source.affected_by(p) for p in changed)]
            if self._overrides_path in changed:
                await loop.run_in_executor(None, self.reload_overrides)
            if names:
                await loop.run_in_executor(None, self.reload, names)
