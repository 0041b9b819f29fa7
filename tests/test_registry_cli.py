"""``lorakit registry`` end to end through the real CLI (subprocesses), on small folders."""

from __future__ import annotations

import json

from tests.conftest import assert_nothing_written, run_cli


def _folder(path, files: dict[str, str]):
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def test_registry_cli_workflow(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_REGISTRY", str(tmp_path / "reg"))
    base = _folder(tmp_path / "base", {"config.json": "{}", "model.safetensors": "weights"})
    quant = _folder(tmp_path / "q", {"config.json": '{"q": 1}', "model.safetensors": "qweights",
                                     "lorakit_quant.json": '{"bits": 4}'})
    gate = _folder(tmp_path / "gate", {"gate.json": json.dumps({"passed": False, "degradation": 0.2})})

    out = run_cli("registry", "register", str(base), "--name", "base", "--kind", "base", "--json", check=True)
    assert json.loads(out.stdout)["ref"] == "base@1"
    out = run_cli("registry", "register", str(quant), "--name", "rel", "--kind", "quantized", "--parent", "base@1",
                  "--param", "bits=4", "--param", "method=gptq", "--metric", "ppl=15.9", "--tag", "g32", check=True)
    assert "registered rel@1" in out.stdout
    assert "already registered as rel@1" in run_cli("registry", "register", str(quant), "--name", "rel", "--kind",
                                                    "quantized", check=True).stdout
    listed = json.loads(run_cli("registry", "ls", "--json", check=True).stdout)
    assert [v["ref"] for v in listed] == ["base@1", "rel@1"]
    assert "rel@1" in run_cli("registry", "ls", "rel", check=True).stdout
    shown = json.loads(run_cli("registry", "show", "rel@latest", "--json", check=True).stdout)
    assert shown["metrics"] == {"ppl": 15.9} and shown["metadata"]["lorakit_quant.json"] == {"bits": 4}
    assert "sha256:" in run_cli("registry", "show", "rel", check=True).stdout

    tree = run_cli("registry", "lineage", "rel@1", check=True).stdout
    assert "rel@1" in tree and "base@1" in tree and '"method": "gptq"' in tree
    tree_json = json.loads(run_cli("registry", "lineage", "rel@1", "--json", check=True).stdout)
    assert tree_json["parents"][0]["params"] == {"bits": 4, "method": "gptq"}

    assert "rel@candidate -> rel@1" in run_cli("registry", "alias", "rel@1", "candidate", check=True).stdout
    refused = run_cli("registry", "promote", "rel@candidate")
    assert refused.returncode == 3 and "no gate verdict" in refused.stderr
    run_cli("registry", "register", str(gate), "--name", "rel-gate", "--kind", "verdict", "--parent", "rel@1", check=True)
    refused = run_cli("registry", "promote", "rel@1")
    assert refused.returncode == 3 and "failed its gate" in refused.stderr
    assert run_cli("registry", "promote", "rel@1", "--force").returncode == 2
    forced = run_cli("registry", "promote", "rel@1", "--force", "--reason", "accepted by QA", check=True)
    assert "FORCED: accepted by QA" in forced.stdout
    history = json.loads(run_cli("registry", "history", "rel", "--json", check=True).stdout)
    assert [(h["alias"], h["forced"], h["reason"]) for h in history] == [
        ("candidate", False, None), ("production", True, "accepted by QA")]

    resolved = run_cli("registry", "resolve", "rel@production", check=True).stdout.strip()
    assert (tmp_path / "reg" / "checkouts") in __import__("pathlib").Path(resolved).parents
    assert json.loads(run_cli("registry", "verify", "--json", check=True).stdout)["ok"] is True
    assert json.loads(run_cli("registry", "gc", "--dry-run", "--json", check=True).stdout)["blobs"] == []
    run_cli("registry", "export", "rel@production", "-o", str(tmp_path / "exp"), check=True)
    assert (tmp_path / "exp" / "model.safetensors").read_text() == "qweights"

    # Bad input: exit 2, one line, nothing written.
    bad = run_cli("registry", "register", str(base), "--name", "../evil", "--kind", "base")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "not allowed" in bad.stderr
    bad = run_cli("registry", "export", "rel@9", "-o", str(tmp_path / "exp2"))
    assert bad.returncode == 2 and "rel@9 does not exist" in bad.stderr
    assert_nothing_written(tmp_path / "exp2")
    assert run_cli("registry", "register", str(base), "--name", "x", "--kind", "base", "--metric", "ppl=high").returncode == 2

    # Corruption makes verify exit 1 and names the file.
    blob = next(p for p in (tmp_path / "reg" / "blobs").rglob("*") if p.is_file() and p.read_bytes() == b"qweights")
    blob.chmod(0o644)
    blob.write_bytes(b"qweightz")
    report = run_cli("registry", "verify")
    assert report.returncode == 1 and "CORRUPT rel@1: model.safetensors" in report.stdout
