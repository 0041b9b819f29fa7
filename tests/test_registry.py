"""The registry API on small real folders: refs, versions, idempotency, lineage, aliases, promotion, integrity."""

from __future__ import annotations

import json
import os
import random
import sqlite3
from pathlib import Path

import pytest

from lorakit.errors import EXIT_REJECTED, InputError, LorakitError
from lorakit.io.digests import file_manifest, manifest_digest
from registry import (
    CorruptArtifactError, PromotionRefusedError, Registry, UnknownReferenceError, parse_ref,
)
from registry import index as registry_index

_rng = random.Random(0)


def model_folder(path: Path, payload: bytes | None = None, extra: dict[str, object] | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (path / "model.safetensors").write_bytes(payload if payload is not None else _rng.randbytes(4096))
    for name, content in (extra or {}).items():
        (path / name).write_text(json.dumps(content))
    return path


def adapter_folder(path: Path, extra: dict[str, object] | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (path / "adapter_model.safetensors").write_bytes(_rng.randbytes(2048))
    for name, content in (extra or {}).items():
        (path / name).write_text(json.dumps(content))
    return path


def gate_folder(path: Path, passed: bool, degradation: float = 0.01) -> Path:
    path.mkdir(parents=True)
    (path / "gate.json").write_text(json.dumps({"passed": passed, "degradation": degradation, "max_degradation": 0.05}))
    (path / "gate.md").write_text("verdict\n")
    return path


@pytest.fixture
def reg(tmp_path) -> Registry:
    with Registry(tmp_path / "registry") as r:
        yield r


# -- references and names ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("ref, expected", [
    ("m@3", ("m", 3, None, None)),
    ("m@candidate", ("m", None, "candidate", None)),
    ("m", ("m", None, "latest", None)),
    ("m@sha256:abcdef0123", ("m", None, None, "abcdef0123")),
    ("sha256:" + "a" * 64, (None, None, None, "a" * 64)),
])
def test_parse_ref(ref, expected):
    r = parse_ref(ref)
    assert (r.name, r.version, r.alias, r.digest) == expected


@pytest.mark.parametrize("bad", [
    "", "a/b", "../x", "..", "a..b", "x" * 65, "a\\b", "a b", ".hidden", "-x", "m@0", "m@sha256:zz", "m@a/b",
    "sha256:abc", "m@x y",
])
def test_bad_names_and_refs_are_refused(bad):
    with pytest.raises(InputError):
        parse_ref(bad)


@pytest.mark.parametrize("name", ["../../escape", "a/b", "..", "x" * 65, "/abs", "a\0b"])
def test_register_refuses_traversal_names_and_writes_nothing(reg, tmp_path, name):
    src = model_folder(tmp_path / "m")
    with pytest.raises(InputError, match="not allowed|characters long"):
        reg.register(src, name=name, kind="base")
    assert not (reg.root / "blobs").exists()
    assert reg.list() == []
    assert not any(p.name == "escape" for p in tmp_path.rglob("*"))


def test_wrong_kind_or_folder_is_refused(reg, tmp_path):
    src = model_folder(tmp_path / "m")
    with pytest.raises(InputError, match="kind 'model' is not one of"):
        reg.register(src, name="m", kind="model")
    with pytest.raises(InputError, match="no adapter_config.json"):
        reg.register(src, name="m", kind="adapter")
    with pytest.raises(InputError, match="does not exist"):
        reg.register(tmp_path / "missing", name="m", kind="base")
    with pytest.raises(UnknownReferenceError, match="no artifact named 'ghost'"):
        reg.register(src, name="m", kind="base", parents=["ghost@1"])
    with pytest.raises(InputError, match="not a finite number"):
        reg.register(src, name="m", kind="base", metrics={"ppl": float("nan")})
    assert reg.list() == [] and not (reg.root / "blobs").exists()


# -- versions and idempotency -----------------------------------------------------------------------------------
def test_versions_increment_and_reregistration_is_idempotent(reg, tmp_path):
    a = model_folder(tmp_path / "a")
    b = model_folder(tmp_path / "b")
    v1 = reg.register(a, name="m", kind="base", metrics={"ppl": 12.5}, tags=["fp32"])
    assert (v1.ref, v1.created, v1.files, v1.metrics, v1.tags) == ("m@1", True, 2, {"ppl": 12.5}, ["fp32"])
    assert v1.digest == manifest_digest(file_manifest(a), "base")
    blobs_before = sorted(reg.blobs.digests())
    again = reg.register(a, name="m", kind="base")
    assert (again.ref, again.created, again.digest) == ("m@1", False, v1.digest)
    assert sorted(reg.blobs.digests()) == blobs_before
    v2 = reg.register(b, name="m", kind="base")
    assert v2.ref == "m@2"
    # Same bytes under another name: a new version there, but the blobs are shared, not copied again.
    other = reg.register(a, name="copy", kind="base")
    assert other.ref == "copy@1" and other.digest == v1.digest
    assert len(list(reg.blobs.digests())) == len(blobs_before) + 1  # b's weights (its config equals a's)
    # One name holds one kind.
    with pytest.raises(InputError, match="holds base artifacts"):
        reg.register(adapter_folder(tmp_path / "ad"), name="m", kind="adapter")
    assert reg.get("m").ref == "m@2" and reg.get("m@latest").ref == "m@2"
    assert reg.get(f"m@sha256:{v1.digest[:10]}").ref == "m@1"
    assert reg.get(f"sha256:{v2.digest}").ref == "m@2"
    assert [v.ref for v in reg.list()] == ["copy@1", "m@1", "m@2"]
    assert [v.ref for v in reg.list(kind="adapter")] == []
    with pytest.raises(UnknownReferenceError, match="versions 1..2"):
        reg.get("m@9")


def test_stage_jsons_are_recorded_as_metadata(reg, tmp_path):
    merge_meta = {"method": "linear", "weights": [0.5, 0.5]}
    src = model_folder(tmp_path / "merged", extra={"lorakit_merge.json": merge_meta, "lorakit_quant.json": {"bits": 4}})
    (src / "prep.json").write_text("{truncated")
    v = reg.register(src, name="merged", kind="merged")
    assert v.metadata["lorakit_merge.json"] == merge_meta
    assert v.metadata["lorakit_quant.json"] == {"bits": 4}
    assert "unreadable" in v.metadata["prep.json"]
    assert reg.get("merged@1").metadata == v.metadata


# -- lineage ----------------------------------------------------------------------------------------------------
def test_lineage_tree_with_edge_params_and_descendants(reg, tmp_path):
    base = reg.register(model_folder(tmp_path / "base"), name="base", kind="base")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prep.json").write_text(json.dumps({"max_length": 512}))
    (tmp_path / "data" / "train.texts.jsonl").write_text('{"text": "hi"}\n')
    data = reg.register(tmp_path / "data", name="data", kind="dataset", parents=[base.ref], params={"max_length": 512})
    ad1 = reg.register(adapter_folder(tmp_path / "a1"), name="task-a", kind="adapter",
                       parents=[base.ref, data.ref], params={"r": 16, "lr": 2e-4})
    ad2 = reg.register(adapter_folder(tmp_path / "a2"), name="task-b", kind="adapter",
                       parents=[base.ref, data.ref], params={"r": 16, "lr": 1e-4})
    merged = reg.register(model_folder(tmp_path / "mg"), name="merged", kind="merged",
                          parents=[(ad1.ref, {"weight": 0.7}), (ad2.ref, {"weight": 0.3}), (base.ref, {"role": "base"})])
    quant = reg.register(model_folder(tmp_path / "q"), name="release", kind="quantized",
                         parents=["merged@latest"], params={"method": "gptq", "bits": 4})

    tree = reg.lineage(quant.ref)
    assert tree.artifact.ref == "release@1" and tree.params is None
    (m,) = tree.parents
    assert m.artifact.ref == "merged@1" and m.params == {"method": "gptq", "bits": 4}
    assert {(p.artifact.ref, json.dumps(p.params, sort_keys=True)) for p in m.parents} == {
        ("task-a@1", '{"weight": 0.7}'), ("task-b@1", '{"weight": 0.3}'), ("base@1", '{"role": "base"}'),
    }
    task_a = next(p for p in m.parents if p.artifact.name == "task-a")
    assert {p.artifact.ref: p.params for p in task_a.parents}[data.ref] == {"r": 16, "lr": 2e-4}
    kinds = {n.artifact.kind for n in tree.walk()}
    assert kinds == {"quantized", "merged", "adapter", "dataset", "base"}
    assert json.loads(json.dumps(tree.to_dict()))["parents"][0]["ref"] == "merged@1"
    assert [v.ref for v in reg.descendants(data.ref)] == ["merged@1", "release@1", "task-a@1", "task-b@1"]
    assert reg.descendants(quant.ref) == []


# -- aliases, verdicts and promotion ----------------------------------------------------------------------------
def test_alias_moves_are_recorded(reg, tmp_path):
    reg.register(model_folder(tmp_path / "a"), name="m", kind="base")
    reg.register(model_folder(tmp_path / "b"), name="m", kind="base")
    reg.set_alias("m@1", "candidate")
    move = reg.set_alias("m@2", "candidate")
    assert (move.version, move.previous_version, move.forced) == (2, 1, False)
    assert reg.get("m@candidate").version == 2
    assert reg.get("m@2").aliases == ["candidate"]
    assert [(h.version, h.previous_version) for h in reg.alias_history("m", "candidate")] == [(1, None), (2, 1)]
    assert str(os.getpid()) in reg.alias_history("m")[0].actor
    with pytest.raises(InputError, match="set by promote"):
        reg.set_alias("m@1", "production")
    for bad in ("latest", "sha256x", "a/b", "9"):
        with pytest.raises(InputError):
            reg.set_alias("m@1", bad)
    with pytest.raises(UnknownReferenceError, match="has no alias 'staging'.*candidate"):
        reg.get("m@staging")


def test_promotion_needs_a_passing_verdict_or_a_recorded_force(reg, tmp_path):
    q1 = reg.register(model_folder(tmp_path / "q1"), name="rel", kind="quantized")
    with pytest.raises(PromotionRefusedError, match="has no gate verdict") as exc:
        reg.promote(q1.ref)
    assert exc.value.exit_code == EXIT_REJECTED
    # A failed gate registered as a verdict artifact attaches to its single parent.
    bad = reg.register(gate_folder(tmp_path / "g1", passed=False, degradation=0.23), name="rel-gate", kind="verdict",
                       parents=[q1.ref])
    assert reg.get(q1.ref).verdict["passed"] is False and reg.get(q1.ref).verdict["source"] == bad.ref
    with pytest.raises(PromotionRefusedError, match=r"failed its gate \(degradation 0.23\)"):
        reg.promote(q1.ref)
    with pytest.raises(InputError, match="needs --reason"):
        reg.promote(q1.ref, force=True)
    forced = reg.promote(q1.ref, force=True, reason="hotfix for incident 42")
    assert forced.forced and reg.get("rel@production").version == 1

    # A passing verdict given at registration time (gate folder path) allows promotion.
    q2 = reg.register(model_folder(tmp_path / "q2"), name="rel", kind="quantized", verdict=gate_folder(tmp_path / "g2", True))
    move = reg.promote(q2.ref)
    assert (move.version, move.previous_version, move.forced) == (2, 1, False)
    # A verdict naming the candidate among several parents (role=candidate) applies to that parent only.
    q3 = reg.register(model_folder(tmp_path / "q3"), name="rel", kind="quantized")
    reg.register(gate_folder(tmp_path / "g3", True), name="rel-gate", kind="verdict",
                 parents=[(q3.ref, {"role": "candidate"}), (q1.ref, {"role": "baseline"})])
    assert reg.get(q3.ref).verdict["passed"] is True
    assert reg.get(q1.ref).verdict["passed"] is False
    reg.promote(q3.ref)
    # set_verdict attaches one later (a registered verdict reference).
    q4 = reg.register(model_folder(tmp_path / "q4"), name="rel", kind="quantized")
    reg.set_verdict(q4.ref, "rel-gate@2")
    reg.promote(q4.ref)
    with pytest.raises(InputError, match="is a quantized, not a verdict"):
        reg.set_verdict(q4.ref, "rel@1")
    history = reg.alias_history("rel", "production")
    assert [(h.version, h.forced, h.reason) for h in history] == [
        (1, True, "hotfix for incident 42"), (2, False, None), (3, False, None), (4, False, None),
    ]


# -- integrity --------------------------------------------------------------------------------------------------
def test_verify_detects_tampered_blob_and_resolve_refuses_it(reg, tmp_path):
    src = model_folder(tmp_path / "m")
    v = reg.register(src, name="m", kind="base")
    checkout = reg.resolve(v.ref)
    assert file_manifest(checkout) == file_manifest(src)
    assert reg.verify().ok and reg.verify(v.ref).ok

    blob = reg.blobs.path(file_manifest(src)["model.safetensors"])
    st = blob.stat()
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF
    blob.write_bytes(bytes(data))
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: only the bytes changed

    report = reg.verify()
    assert not report.ok and any("m@1: model.safetensors" in p for p in report.problems)
    assert not reg.verify(v.ref).ok
    with pytest.raises(CorruptArtifactError, match="m@1 is corrupt"):
        reg.resolve(v.ref)
    reg.checkouts.remove(v.digest)  # a fresh checkout is refused too
    with pytest.raises(CorruptArtifactError, match="m@1 is corrupt"):
        reg.resolve(v.ref)
    assert not reg.checkouts.path(v.digest).exists() and reg.checkouts.temporaries() == []
    out = tmp_path / "export"
    with pytest.raises(CorruptArtifactError):
        reg.export(v.ref, out)
    assert not out.exists() and not list(tmp_path.glob(".export.*"))
    assert not reg.verify().ok
    # Registering the intact source again (under any name) re-hashes the shared blob and repairs it.
    reg.register(src, name="m-again", kind="base")
    assert reg.verify().ok
    assert file_manifest(reg.resolve(v.ref)) == file_manifest(src)


def test_a_source_edited_during_registration_is_refused(reg, tmp_path):
    src = tmp_path / "shard.bin"
    src.write_bytes(b"a" * 1000)
    stat_when_hashed = src.stat()
    digest = __import__("hashlib").sha256(b"a" * 1000).hexdigest()
    src.write_bytes(b"b" * 1001)  # edited between hashing and copying
    with pytest.raises(InputError, match="changed while it was being registered"):
        reg.blobs.put(src, digest, stat_when_hashed)
    assert not reg.blobs.has(digest) and list(reg.blobs.temporaries()) == []


def test_edited_checkout_is_rebuilt_from_blobs(reg, tmp_path):
    v = reg.register(model_folder(tmp_path / "m"), name="m", kind="base")
    checkout = reg.resolve(v.ref)
    (checkout / "injected.py").write_text("print('hi')")
    assert reg.resolve(v.ref) == checkout
    assert sorted(p.name for p in checkout.iterdir()) == ["config.json", "model.safetensors"]


def test_unsafe_path_in_a_tampered_index_is_refused(reg, tmp_path):
    v = reg.register(model_folder(tmp_path / "m"), name="m", kind="base")
    with sqlite3.connect(reg.root / "index.sqlite") as db:
        db.execute("UPDATE files SET path='../../escaped.json' WHERE path='config.json'")
    report = reg.verify()
    assert any("unsafe stored path" in p for p in report.problems)
    with pytest.raises(CorruptArtifactError, match="unsafe file path"):
        reg.resolve(v.ref)
    with pytest.raises(CorruptArtifactError, match="unsafe file path"):
        reg.export(v.ref, tmp_path / "out")
    assert not list(tmp_path.rglob("escaped.json"))


def test_gc_removes_only_unreferenced_blobs_and_leftovers(reg, tmp_path):
    v = reg.register(model_folder(tmp_path / "m"), name="m", kind="base")
    reg.resolve(v.ref)
    loose = tmp_path / "loose"
    loose.write_bytes(b"orphan")
    from lorakit.io.digests import sha256_file

    orphan = sha256_file(loose)
    reg.blobs.put(loose, orphan)
    (reg.blobs.path(orphan).parent / ".tmp-crashed").write_bytes(b"partial")
    (reg.checkouts.root / ("0" * 64)).mkdir()  # checkout of a digest no version has
    assert reg.verify().orphan_blobs == [orphan]

    dry = reg.gc(dry_run=True)
    assert (dry.blobs, dry.temporaries, dry.checkouts) == ([orphan], 1, ["0" * 64])
    assert reg.blobs.has(orphan)
    done = reg.gc()
    assert done.blobs == [orphan] and done.freed_bytes == 6
    assert not reg.blobs.has(orphan) and not (reg.checkouts.root / ("0" * 64)).exists()
    assert reg.gc().blobs == []
    report = reg.verify()
    assert report.ok and report.orphan_blobs == [] and report.temporaries == 0
    assert file_manifest(reg.resolve(v.ref)) == file_manifest(tmp_path / "m")


# -- schema -----------------------------------------------------------------------------------------------------
def test_schema_is_versioned_and_migrates_forward(tmp_path):
    root = tmp_path / "reg"
    root.mkdir()
    db = root / "index.sqlite"
    # A registry written by the first schema (before metrics/verdicts/alias history existed).
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL, applied_at REAL NOT NULL)")
    for statement in registry_index.MIGRATIONS[0].split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.execute("INSERT INTO schema_version VALUES (1, 0)")
    conn.close()
    with Registry(root) as reg:
        assert registry_index.schema_version(reg.conn) == registry_index.SCHEMA_VERSION
        assert reg.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert reg.conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        reg.register(model_folder(tmp_path / "m"), name="m", kind="base", metrics={"ppl": 1.0})
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO schema_version VALUES (99, 0)")
    with pytest.raises(LorakitError, match="newer than this lorakit understands"):
        Registry(root).conn


def test_default_root_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_REGISTRY", str(tmp_path / "r1"))
    assert Registry().root == tmp_path / "r1"
    monkeypatch.delenv("LORAKIT_REGISTRY")
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path / "home"))
    assert Registry().root == tmp_path / "home" / "registry"


def test_registry_stays_a_light_top_level_package(tmp_path):
    """registry may use lorakit.io/errors only: no Prefect, tasks or flows, and no torch at import."""
    import re
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    for src in (root / "registry").glob("*.py"):
        imports = re.findall(r"^\s*(?:from|import)\s+([\w.]+)", src.read_text(), re.M)
        assert not [m for m in imports if m.split(".")[0] in ("prefect", "tasks", "flows", "torch")], src
        assert not [m for m in imports if m.startswith("lorakit.") and
                    m.split(".")[1] not in ("io", "errors", "home")], src
    code = ("import sys, registry; registry.Registry(sys.argv[1]).conn; "
            "print(sorted(m for m in ('torch', 'prefect', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "r")], cwd=root, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
