"""The registry API: register artifacts, find them by reference, follow their lineage, promote releases.

One :class:`Registry` is a root folder holding ``index.sqlite`` (names, versions, aliases, lineage, metrics),
``blobs/`` (each file once, by sha256) and ``checkouts/`` (loadable folders built from blobs). The order of
every write is what makes a crash harmless: blobs first (each atomically), the index row last in one
transaction. A version is therefore either absent or complete; what a crash can leave is unreferenced blobs,
which ``gc`` removes.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import InputError
from lorakit.io.atomic import atomic_dir
from lorakit.io.digests import manifest_digest
from registry import index
from registry.blobs import BlobStore, hash_file
from registry.checkout import Checkouts, StoredFile, copy_verified, safe_relpath
from registry.errors import CorruptArtifactError, PromotionRefusedError, UnknownReferenceError
from registry.locks import write_lock
from registry.metadata import (
    GATE_FILE, check_folder_kind, clean_metrics, read_stage_metadata, to_json, validate_kind, verdict_from_gate,
)
from registry.refs import (
    DIGEST_PREFIX, LATEST, PRODUCTION, Ref, looks_like_ref, parse_ref, validate_alias, validate_name, validate_tag,
)

DB_FILE = "index.sqlite"


def default_root() -> Path:
    """``$LORAKIT_REGISTRY``, else ``$LORAKIT_HOME/registry``."""
    env = os.environ.get("LORAKIT_REGISTRY")
    if env:
        return Path(env).expanduser()
    from lorakit.home import lorakit_home

    return lorakit_home() / "registry"


@dataclass
class ArtifactVersion:
    """One immutable registered version, with what is attached to it now (aliases, verdict)."""

    name: str
    version: int
    kind: str
    digest: str
    size: int
    files: int
    created_at: float
    source: str | None
    params: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    verdict: dict | None = None  # {"passed": bool, "details": {...}, "source": "name@N" | None, "at": ts}
    created: bool = False  # True when the call that returned it stored it (False: it was already registered)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def digest_ref(self) -> str:
        return f"{self.name}@{DIGEST_PREFIX}{self.digest}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ref"] = self.ref
        return d


@dataclass
class LineageNode:
    """An artifact and the artifacts it was made from; ``params`` are those of the step child <- this node."""

    artifact: ArtifactVersion
    params: dict | None
    parents: list[LineageNode]

    def to_dict(self) -> dict:
        return {
            "ref": self.artifact.ref, "kind": self.artifact.kind, "digest": self.artifact.digest,
            "params": self.params, "parents": [p.to_dict() for p in self.parents],
        }

    def walk(self) -> Iterable[LineageNode]:
        yield self
        for p in self.parents:
            yield from p.walk()


@dataclass
class AliasMove:
    name: str
    alias: str
    version: int
    previous_version: int | None
    at: float
    actor: str
    forced: bool
    reason: str | None


@dataclass
class VerifyReport:
    ok: bool
    artifacts: int
    blobs: int
    problems: list[str]
    orphan_blobs: list[str]
    temporaries: int


@dataclass
class GcReport:
    dry_run: bool
    blobs: list[str]
    freed_bytes: int
    temporaries: int
    checkouts: list[str]


def _actor() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry in some containers
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}:{os.getpid()}"


def _scan(folder: Path) -> list[tuple[str, Path]]:
    """Every file under ``folder`` (sorted, POSIX-relative); symlinked files are stored by content."""
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for fname in filenames:
            path = Path(dirpath) / fname
            rel = path.relative_to(folder).as_posix()
            if not path.is_file():
                raise InputError(f"{path} is not a regular file (a broken link or a device); remove it and register again")
            if "\\" in rel or any(part.startswith(".tmp-") for part in rel.split("/")):
                raise InputError(f"{path}: file names with '\\' or temporary files (.tmp-*) cannot be registered; remove it")
            out.append((rel, path))
    return sorted(out)


class Registry:
    """A local model registry rooted at ``root`` (default ``$LORAKIT_REGISTRY`` or ``$LORAKIT_HOME/registry``)."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_root()
        if self.root.exists() and not self.root.is_dir():
            raise InputError(f"registry root {self.root} is a file; point LORAKIT_REGISTRY at a folder")
        self.root.mkdir(parents=True, exist_ok=True)
        self.blobs = BlobStore(self.root / "blobs")
        self.checkouts = Checkouts(self.root, self.blobs)
        self._conn: sqlite3.Connection | None = None

    # -- plumbing -----------------------------------------------------------------------------------------------
    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = index.connect(self.root / DB_FILE)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        return index.with_retry(lambda: self.conn.execute(sql, args).fetchall())

    @contextlib.contextmanager
    def _snapshot(self):
        """Run several reads against one consistent state (a WAL read transaction), even while others write."""
        if self.conn.in_transaction:
            yield
            return
        index.with_retry(lambda: self.conn.execute("BEGIN DEFERRED"))
        try:
            yield
        finally:
            self.conn.execute("COMMIT")

    # -- lookups ------------------------------------------------------------------------------------------------
    def _row(self, ref: str | Ref) -> sqlite3.Row:
        r = parse_ref(ref) if isinstance(ref, str) else ref
        if r.name is None:
            rows = self._read("SELECT * FROM artifacts WHERE digest LIKE ? ORDER BY id", (r.digest + "%",))
            if not rows:
                raise UnknownReferenceError(f"no registered artifact has digest {DIGEST_PREFIX}{r.digest}; "
                                            "lorakit registry ls shows what exists")
            if len({row["digest"] for row in rows}) > 1:
                raise InputError(f"digest prefix {DIGEST_PREFIX}{r.digest} matches several artifacts; give more hex digits")
            return rows[0]
        if r.version is not None:
            rows = self._read("SELECT * FROM artifacts WHERE name=? AND version=?", (r.name, r.version))
        elif r.digest is not None:
            rows = self._read("SELECT * FROM artifacts WHERE name=? AND digest LIKE ?", (r.name, r.digest + "%"))
            if len(rows) > 1:
                raise InputError(f"{r} matches several versions; give more hex digits")
        elif r.alias == LATEST:
            rows = self._read("SELECT * FROM artifacts WHERE name=? ORDER BY version DESC LIMIT 1", (r.name,))
        else:
            rows = self._read(
                "SELECT a.* FROM aliases x JOIN artifacts a ON a.id = x.artifact_id WHERE x.name=? AND x.alias=?",
                (r.name, r.alias),
            )
        if rows:
            return rows[0]
        versions = self._read("SELECT version FROM artifacts WHERE name=? ORDER BY version", (r.name,))
        if not versions:
            raise UnknownReferenceError(f"no artifact named {r.name!r} is registered; lorakit registry ls shows what exists")
        if r.alias:
            names = [row["alias"] for row in self._read("SELECT alias FROM aliases WHERE name=? ORDER BY alias", (r.name,))]
            raise UnknownReferenceError(
                f"{r.name} has no alias {r.alias!r} (aliases: {', '.join(names) or 'none'}); "
                f"set one with lorakit registry alias {r.name}@<version> {r.alias}"
            )
        raise UnknownReferenceError(
            f"{r} does not exist ({r.name} has versions {versions[0]['version']}..{versions[-1]['version']})"
        )

    def _version(self, row: sqlite3.Row, created: bool = False) -> ArtifactVersion:
        aid = row["id"]
        metrics = {m["key"]: m["value"] for m in self._read("SELECT key, value FROM metrics WHERE artifact_id=? ORDER BY key", (aid,))}
        tags = [t["tag"] for t in self._read("SELECT tag FROM tags WHERE artifact_id=? ORDER BY tag", (aid,))]
        aliases = [a["alias"] for a in self._read("SELECT alias FROM aliases WHERE artifact_id=? ORDER BY alias", (aid,))]
        nfiles = self._read("SELECT COUNT(*) AS n FROM files WHERE artifact_id=?", (aid,))[0]["n"]
        return ArtifactVersion(
            name=row["name"], version=row["version"], kind=row["kind"], digest=row["digest"], size=row["size"],
            files=nfiles, created_at=row["created_at"], source=row["source"], params=json.loads(row["params"]),
            metadata=json.loads(row["metadata"]), metrics=metrics, tags=tags, aliases=aliases,
            verdict=self._verdict(aid), created=created,
        )

    def _verdict(self, artifact_id: int) -> dict | None:
        rows = self._read(
            "SELECT v.*, s.name AS sname, s.version AS sversion FROM verdicts v LEFT JOIN artifacts s ON s.id = v.source_id "
            "WHERE v.artifact_id=? ORDER BY v.id DESC LIMIT 1",
            (artifact_id,),
        )
        if not rows:
            return None
        v = rows[0]
        source = f"{v['sname']}@{v['sversion']}" if v["sname"] else None
        return {"passed": bool(v["passed"]), "details": json.loads(v["details"]), "source": source, "at": v["at"]}

    def _files(self, row: sqlite3.Row) -> list[StoredFile]:
        return [(f["path"], f["blob"], f["size"])
                for f in self._read("SELECT path, blob, size FROM files WHERE artifact_id=? ORDER BY path", (row["id"],))]

    def get(self, ref: str) -> ArtifactVersion:
        """The version a reference names (``name@3``, ``name@candidate``, ``name@sha256:..``, ``sha256:..``)."""
        with self._snapshot():
            return self._version(self._row(ref))

    def list(self, name: str | None = None, kind: str | None = None) -> list[ArtifactVersion]:
        """All versions, optionally of one name and/or kind, in name then version order."""
        sql, args = "SELECT * FROM artifacts WHERE 1=1", []
        if name is not None:
            sql += " AND name=?"
            args.append(validate_name(name))
        if kind is not None:
            sql += " AND kind=?"
            args.append(validate_kind(kind))
        with self._snapshot():
            return [self._version(r) for r in self._read(sql + " ORDER BY name, version", args)]

    # -- registration -------------------------------------------------------------------------------------------
    def register(
        self,
        path: str | os.PathLike[str],
        *,
        name: str,
        kind: str,
        metrics: Mapping[str, float] | None = None,
        params: Mapping[str, Any] | None = None,
        parents: Iterable[str | tuple[str, Mapping[str, Any]]] = (),
        tags: Iterable[str] = (),
        verdict: str | os.PathLike[str] | Mapping[str, Any] | bool | None = None,
        progress: bool = False,
        checkout: bool = True,
        metadata: Mapping[str, Any] | None = None,
    ) -> ArtifactVersion:
        """Store the folder at ``path`` as the next version of ``name`` (or return the identical existing one).

        ``parents`` are references to the artifacts this one was made from; each edge records ``params`` (the
        step's parameters) unless given as ``(ref, edge_params)``. ``verdict`` is a registered verdict's reference,
        a gate output folder / gate.json, or ``{"passed": bool, ...}``; a ``verdict``-kind artifact registered with
        one parent (or parents whose edge params say ``{"role": "candidate"}``) becomes that parent's verdict.
        Re-registering identical content (same files, same kind) returns the existing version unchanged.
        ``checkout`` builds the loadable folder right away (hard links, no copy), so ``resolve`` costs a stat.
        ``metadata``: extra documents by file name (e.g. ``{"scorecard.json": {...}}``) kept beside the stage JSONs
        read from the folder; they describe the version, they are not part of its content digest.
        """
        folder = Path(path).expanduser()
        validate_name(name)
        validate_kind(kind)
        clean_tags = sorted({validate_tag(t) for t in tags})
        clean = clean_metrics(metrics)
        params_json = to_json(dict(params or {}), "params")
        if not folder.is_dir():
            raise InputError(f"{folder} does not exist or is not a folder; register an artifact folder")
        check_folder_kind(folder, kind)
        edges = self._resolve_parents(parents, dict(params or {}))
        attached = self._resolve_verdict(verdict) if verdict is not None else None
        files = _scan(folder)
        if not files:
            raise InputError(f"{folder} is empty; there is nothing to register")
        metadata_json = to_json({**read_stage_metadata(folder), **dict(metadata or {})}, f"metadata JSONs in {folder}")

        stats = {rel: p.stat() for rel, p in files}
        total = sum(st.st_size for st in stats.values())
        bar = _progress_bar(total, f"register {name}", progress)
        try:
            manifest = {rel: hash_file(p, bar.update if bar else None) for rel, p in files}
        finally:
            if bar:
                bar.close()
        digest = manifest_digest(manifest, kind)
        existing = self._existing(name, kind, digest)
        if existing is not None:
            return existing
        with write_lock(self.root, exclusive=False):
            written = {manifest[rel] for rel, p in files if self.blobs.put(p, manifest[rel], stats[rel])}
            for rel, p in files:
                # Blobs shared with earlier artifacts are re-hashed; a corrupt one is repaired from this source.
                if manifest[rel] not in written and self.blobs.check(manifest[rel], stats[rel].st_size):
                    self.blobs.put(p, manifest[rel], stats[rel], replace=True)
                written.add(manifest[rel])
            row, created = index.with_retry(lambda: self._insert(
                name, kind, digest, folder, files, manifest, total, params_json, metadata_json, clean, clean_tags,
                edges, attached,
            ))
            if created and checkout:
                # Every blob was just written or re-hashed, so the checkout needs no second hashing pass. It is a
                # cache: if building it fails, resolve builds it later.
                with contextlib.suppress(OSError, CorruptArtifactError):
                    self.checkouts.materialize(digest, self._files(row), f"{name}@{row['version']}", trusted=written)
        return self._version(row, created=created)

    def _existing(self, name: str, kind: str, digest: str) -> ArtifactVersion | None:
        rows = self._read("SELECT * FROM artifacts WHERE name=? AND digest=?", (name, digest))
        if rows:
            return self._version(rows[0])
        self._check_kind(name, kind)
        return None

    def _check_kind(self, name: str, kind: str) -> None:
        rows = self._read("SELECT kind FROM artifacts WHERE name=? LIMIT 1", (name,))
        if rows and rows[0]["kind"] != kind:
            raise InputError(f"{name} holds {rows[0]['kind']} artifacts, not {kind}; register under another name")

    def _resolve_parents(self, parents: Iterable, default_params: dict) -> list[tuple[int, str]]:
        out: dict[int, str] = {}
        for item in parents:
            ref, edge_params = (item, default_params) if isinstance(item, str) else (item[0], dict(item[1]))
            out[self._row(ref)["id"]] = to_json(edge_params, f"parameters of the edge from {ref}")
        return list(out.items())

    def _resolve_verdict(self, verdict: Any) -> tuple[bool, dict, int | None]:
        if isinstance(verdict, bool):
            return verdict, {"passed": verdict}, None
        if isinstance(verdict, Mapping):
            passed, details = verdict_from_gate(verdict, "verdict")
            return passed, details, None
        text = str(verdict)
        path = Path(text).expanduser()
        if not path.exists() and (looks_like_ref(text) or "@" in text):
            row = self._row(text)
            if row["kind"] != "verdict":
                raise InputError(f"--verdict {text} is a {row['kind']}, not a verdict; register the gate folder with --kind verdict")
            gate = json.loads(row["metadata"]).get(GATE_FILE)
            passed, details = verdict_from_gate(gate, f"verdict {text}")
            return passed, details, row["id"]
        gate_file = path / GATE_FILE if path.is_dir() else path
        if not gate_file.is_file():
            raise InputError(f"verdict {text} is neither a registered verdict reference nor a gate folder/gate.json")
        try:
            gate = json.loads(gate_file.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"{gate_file} is not valid JSON ({exc}); re-run the gate") from None
        passed, details = verdict_from_gate(gate, str(gate_file))
        return passed, details, None

    def _insert(self, name, kind, digest, folder, files, manifest, total, params_json, metadata_json, metrics, tags,
                edges, attached) -> tuple[sqlite3.Row, bool]:
        conn = self.conn
        with index.transaction(conn):
            row = conn.execute("SELECT * FROM artifacts WHERE name=? AND digest=?", (name, digest)).fetchone()
            if row is not None:  # a concurrent process registered the same content first
                return row, False
            self._check_kind(name, kind)
            version = conn.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM artifacts WHERE name=?", (name,)).fetchone()[0]
            cur = conn.execute(
                "INSERT INTO artifacts (name, version, kind, digest, size, created_at, source, params, metadata) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, version, kind, digest, total, time.time(), str(folder.resolve()), params_json, metadata_json),
            )
            aid = cur.lastrowid
            conn.executemany("INSERT INTO files VALUES (?, ?, ?, ?)",
                             [(aid, rel, manifest[rel], p.stat().st_size) for rel, p in files])
            conn.executemany("INSERT INTO metrics VALUES (?, ?, ?)", [(aid, k, v) for k, v in metrics.items()])
            conn.executemany("INSERT INTO tags VALUES (?, ?)", [(aid, t) for t in tags])
            conn.executemany("INSERT INTO edges VALUES (?, ?, ?)", [(aid, pid, p) for pid, p in edges])
            now = time.time()
            if attached is not None:
                passed, details, source_id = attached
                conn.execute("INSERT INTO verdicts (artifact_id, passed, source_id, details, at) VALUES (?, ?, ?, ?, ?)",
                             (aid, int(passed), source_id, json.dumps(details, sort_keys=True), now))
            if kind == "verdict":
                self._attach_own_verdict(conn, aid, metadata_json, edges, now)
            return conn.execute("SELECT * FROM artifacts WHERE id=?", (aid,)).fetchone(), True

    @staticmethod
    def _attach_own_verdict(conn, aid: int, metadata_json: str, edges: list[tuple[int, str]], now: float) -> None:
        gate = json.loads(metadata_json).get(GATE_FILE)
        passed, details = verdict_from_gate(gate, "the registered gate.json")
        candidates = [pid for pid, p in edges if json.loads(p).get("role") == "candidate"]
        if not candidates and len(edges) == 1:
            candidates = [edges[0][0]]
        for pid in candidates:
            conn.execute("INSERT INTO verdicts (artifact_id, passed, source_id, details, at) VALUES (?, ?, ?, ?, ?)",
                         (pid, int(passed), aid, json.dumps(details, sort_keys=True), now))

    def set_verdict(self, ref: str, verdict: str | os.PathLike[str] | Mapping[str, Any] | bool) -> ArtifactVersion:
        """Attach a gate verdict to an already registered version (the newest verdict counts)."""
        row = self._row(ref)
        passed, details, source_id = self._resolve_verdict(verdict)

        def write() -> None:
            with index.transaction(self.conn):
                self.conn.execute(
                    "INSERT INTO verdicts (artifact_id, passed, source_id, details, at) VALUES (?, ?, ?, ?, ?)",
                    (row["id"], int(passed), source_id, json.dumps(details, sort_keys=True), time.time()),
                )

        index.with_retry(write)
        return self.get(ref)

    # -- materialising ------------------------------------------------------------------------------------------
    def resolve(self, ref: str) -> Path:
        """A plain folder with the artifact's files (verified; refuses corrupt bytes). Treat it as read-only."""
        row = self._row(ref)
        label = f"{row['name']}@{row['version']}"
        with write_lock(self.root, exclusive=False):
            return self.checkouts.materialize(row["digest"], self._files(row), label)

    def export(self, ref: str, out: str | os.PathLike[str], *, force: bool = False) -> Path:
        """Copy the artifact's exact files into ``out`` (atomic; verified while copying)."""
        row = self._row(ref)
        label = f"{row['name']}@{row['version']}"
        out = Path(out).expanduser()
        with atomic_dir(out, force=force) as tmp:
            for rel, blob, size in self._files(row):
                target = tmp / safe_relpath(rel)
                target.parent.mkdir(parents=True, exist_ok=True)
                src = self.blobs.path(blob)
                if not src.is_file() or src.stat().st_size != size:
                    raise CorruptArtifactError(f"{label} is corrupt: the stored bytes of {rel} are missing or truncated; "
                                               "run lorakit registry verify")
                copy_verified(src, target, blob, label)
        return out

    # -- lineage ------------------------------------------------------------------------------------------------
    def lineage(self, ref: str) -> LineageNode:
        """The tree of everything ``ref`` was made from, each edge with the parameters of its step."""
        def node(r: sqlite3.Row, params: dict | None, path: tuple[int, ...]) -> LineageNode:
            parents = []
            if r["id"] not in path:  # edges only point to older versions, but never loop on a damaged index
                for e in self._read("SELECT e.params AS edge_params, a.* FROM edges e JOIN artifacts a ON a.id = e.parent_id "
                                    "WHERE e.child_id=? ORDER BY a.name, a.version", (r["id"],)):
                    parents.append(node(e, json.loads(e["edge_params"]), path + (r["id"],)))
            return LineageNode(self._version(r), params, parents)

        with self._snapshot():
            return node(self._row(ref), None, ())

    def descendants(self, ref: str) -> list[ArtifactVersion]:
        """Everything made (directly or not) from ``ref``: which releases used this dataset or adapter?"""
        row = self._row(ref)
        rows = self._read(
            "WITH RECURSIVE d(id) AS (SELECT child_id FROM edges WHERE parent_id=? "
            "UNION SELECT e.child_id FROM edges e JOIN d ON e.parent_id = d.id) "
            "SELECT a.* FROM artifacts a JOIN d ON a.id = d.id ORDER BY a.name, a.version",
            (row["id"],),
        )
        return [self._version(r) for r in rows]

    # -- aliases and promotion ----------------------------------------------------------------------------------
    def set_alias(self, ref: str, alias: str) -> AliasMove:
        """Point ``name@alias`` at the version ``ref`` names (recorded in the alias history)."""
        validate_alias(alias)
        if alias == PRODUCTION:
            raise InputError("the production alias is set by promote, which checks the gate verdict; "
                             f"run lorakit registry promote {ref}")
        return self._move_alias(self._row(ref), alias, forced=False, reason=None)

    def promote(self, ref: str, *, force: bool = False, reason: str | None = None) -> AliasMove:
        """Give ``ref`` the production alias: only with a passing gate verdict, or ``force`` plus a reason."""
        row = self._row(ref)
        label = f"{row['name']}@{row['version']}"
        verdict = self._verdict(row["id"])
        reason = (reason or "").strip() or None
        if force and not reason:
            raise InputError(f"promoting {label} with --force needs --reason '<why>'; the reason is recorded")
        if verdict is None or not verdict["passed"]:
            if not force:
                why = "has no gate verdict" if verdict is None else "failed its gate"
                detail = verdict["details"].get("degradation") if verdict else None
                raise PromotionRefusedError(
                    f"{label} {why}{f' (degradation {detail})' if detail is not None else ''}; run the gate and "
                    "register its verdict, or override with --force --reason '<why>' (recorded)"
                )
            return self._move_alias(row, PRODUCTION, forced=True, reason=reason)
        return self._move_alias(row, PRODUCTION, forced=False, reason=reason)

    def _move_alias(self, row: sqlite3.Row, alias: str, *, forced: bool, reason: str | None) -> AliasMove:
        name, actor = row["name"], _actor()

        def write() -> AliasMove:
            with index.transaction(self.conn) as conn:
                prev = conn.execute("SELECT a.id, a.version FROM aliases x JOIN artifacts a ON a.id = x.artifact_id "
                                    "WHERE x.name=? AND x.alias=?", (name, alias)).fetchone()
                now = time.time()
                conn.execute("INSERT INTO aliases VALUES (?, ?, ?) ON CONFLICT (name, alias) DO UPDATE SET "
                             "artifact_id = excluded.artifact_id", (name, alias, row["id"]))
                conn.execute("INSERT INTO alias_history (name, alias, artifact_id, previous_id, at, actor, forced, reason) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (name, alias, row["id"], prev["id"] if prev else None, now, actor, int(forced), reason))
            return AliasMove(name, alias, row["version"], prev["version"] if prev else None, now, actor, forced, reason)

        return index.with_retry(write)

    def alias_history(self, name: str, alias: str | None = None) -> list[AliasMove]:
        """Every alias move of ``name`` (optionally one alias), oldest first."""
        validate_name(name)
        sql = ("SELECT h.*, a.version AS version, p.version AS pversion FROM alias_history h "
               "JOIN artifacts a ON a.id = h.artifact_id LEFT JOIN artifacts p ON p.id = h.previous_id WHERE h.name=?")
        args: list[Any] = [name]
        if alias is not None:
            sql += " AND h.alias=?"
            args.append(alias)
        return [AliasMove(h["name"], h["alias"], h["version"], h["pversion"], h["at"], h["actor"], bool(h["forced"]),
                          h["reason"]) for h in self._read(sql + " ORDER BY h.id", args)]

    # -- integrity and space ------------------------------------------------------------------------------------
    def verify(self, ref: str | None = None) -> VerifyReport:
        """Re-hash every stored file (of ``ref``, or of the whole registry) and check the index itself."""
        problems: list[str] = []
        if ref is None:
            check = self._read("PRAGMA quick_check")[0][0]
            if check != "ok":
                problems.append(f"index: {check}")
            for fk in self._read("PRAGMA foreign_key_check"):
                problems.append(f"index: dangling reference in table {fk[0]}")
            rows = self._read("SELECT * FROM artifacts ORDER BY name, version")
        else:
            rows = [self._row(ref)]
        checked: dict[str, str | None] = {}
        for row in rows:
            label = f"{row['name']}@{row['version']}"
            files = self._files(row)
            if not files:
                problems.append(f"{label}: has no files in the index")
            manifest = {rel: blob for rel, blob, _ in files}
            if manifest_digest(manifest, row["kind"]) != row["digest"]:
                problems.append(f"{label}: its file list does not hash to its digest {row['digest'][:12]}")
            for rel, blob, size in files:
                try:
                    safe_relpath(rel)
                except CorruptArtifactError:
                    problems.append(f"{label}: unsafe stored path {rel!r}")
                if blob not in checked:
                    checked[blob] = self.blobs.check(blob, size)
                if checked[blob]:
                    problems.append(f"{label}: {rel} (blob {blob[:12]}) is {checked[blob]}")
        orphans: list[str] = []
        temporaries = 0
        if ref is None:
            referenced = {r["blob"] for r in self._read("SELECT DISTINCT blob FROM files")}
            orphans = [d for d in self.blobs.digests() if d not in referenced]
            temporaries = len(list(self.blobs.temporaries())) + len(self.checkouts.temporaries())
        return VerifyReport(not problems, len(rows), len(checked), problems, orphans, temporaries)

    def gc(self, *, dry_run: bool = False, wait_s: float = 0.0) -> GcReport:
        """Delete blobs no version references, leftovers of interrupted writes, and stale checkouts.

        Takes the exclusive write lock (waiting at most ``wait_s``): while any other process is registering,
        its new blobs are not referenced yet, so gc refuses (RegistryBusyError) rather than guess.
        """
        if dry_run:
            return self._collect(dry_run=True)
        with write_lock(self.root, exclusive=True, wait_s=wait_s):
            return self._collect(dry_run=False)

    def _collect(self, *, dry_run: bool) -> GcReport:
        referenced = {r["blob"] for r in self._read("SELECT DISTINCT blob FROM files")}
        digests = {r["digest"] for r in self._read("SELECT DISTINCT digest FROM artifacts")}
        orphans = [d for d in self.blobs.digests() if d not in referenced]
        stale = [d for d in self.checkouts.digests() if d not in digests]
        temps = list(self.blobs.temporaries()) + self.checkouts.temporaries()
        freed = sum(self.blobs.path(d).stat().st_size for d in orphans)
        if not dry_run:
            for d in orphans:
                self.blobs.remove(d)
            for d in stale:
                self.checkouts.remove(d)
            for t in temps:
                if t.is_dir():
                    import shutil

                    shutil.rmtree(t, ignore_errors=True)
                else:
                    t.unlink(missing_ok=True)
        return GcReport(dry_run, orphans, freed, len(temps), stale)


def _progress_bar(total: int, desc: str, enabled: bool):
    if not enabled or total < (64 << 20):  # small artifacts register in a blink; a bar would only flicker
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False)


def resolve_reference(ref: str) -> Path:
    """Resolve ``ref`` in the default registry: the hook lorakit's model/adapter options use."""
    with Registry() as reg:
        return reg.resolve(ref)
