"""``lorakit registry``: the local model registry from the shell (list, inspect, register, promote, verify)."""

from __future__ import annotations

import json
import time

import click

from lorakit.errors import InputError
from registry.metadata import KINDS

_KINDS = list(KINDS)  # the registry's own list


def _open(ctx: click.Context):
    from registry import Registry

    return Registry(ctx.obj.get("root"))


def _echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _pairs(items: tuple[str, ...], what: str, numeric: bool) -> dict:
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--{what} {item!r} is not KEY=VALUE; write e.g. --{what} {'ppl=14.8' if numeric else 'lr=2e-4'}")
        if numeric:
            try:
                out[key] = float(value)
            except ValueError:
                raise InputError(f"--{what} {item!r}: {value!r} is not a number") from None
        else:
            try:
                out[key] = json.loads(value)
            except json.JSONDecodeError:
                out[key] = value
    return out


def _verdict_text(v) -> str:
    if v.verdict is None:
        return "-"
    return "passed" if v.verdict["passed"] else "FAILED"


@click.group("registry")
@click.option("--root", type=click.Path(file_okay=False), envvar="LORAKIT_REGISTRY",
              help="Registry folder [env LORAKIT_REGISTRY; default $LORAKIT_HOME/registry].")
@click.pass_context
def registry_group(ctx: click.Context, root: str | None) -> None:
    """The local model registry: versioned artifacts with lineage, aliases and gated promotion.

    \b
    Every artifact (prepared data, adapters, merged and quantized models, gate verdicts) is stored once by
    content (sha256) with an immutable version number. References, accepted here and by every lorakit
    option that takes a model or adapter path:
      name@3            version 3            name@candidate    a movable alias
      name / name@latest  the newest version  name@sha256:<hex> / sha256:<hex>  by content digest

    \b
    Promotion rule: `promote` gives the production alias only to a version whose gate verdict passed;
    otherwise it needs --force --reason, and the reason is recorded in the alias history.

    \b
    Examples:
      lorakit registry register out/adapter-a --name support-lora --kind adapter --parent support-data@1
      lorakit registry lineage release@candidate
      lorakit registry promote release@4
      lorakit merge support-lora@candidate faq-lora@2 -o out/m   # references instead of folders
    """
    ctx.ensure_object(dict)
    ctx.obj["root"] = root


@registry_group.command("ls")
@click.argument("name", required=False)
@click.option("--kind", type=click.Choice(_KINDS), help="Only artifacts of this kind.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def ls_cmd(ctx, name, kind, as_json):
    """List registered versions (all, or those of NAME), oldest first."""
    with _open(ctx) as reg:
        versions = reg.list(name, kind)
    if as_json:
        _echo_json([v.to_dict() for v in versions])
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("ref", "kind", "digest", "size", "aliases", "verdict", "metrics", "registered")
    for v in versions:
        metrics = ", ".join(f"{k}={val:g}" for k, val in v.metrics.items())
        table.add_row(v.ref, v.kind, v.digest[:12], _size(v.size), ", ".join(v.aliases), _verdict_text(v), metrics,
                      _when(v.created_at))
    Console().print(table if versions else "no artifacts registered yet (lorakit registry register PATH ...)")


@registry_group.command("show")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (including the stage metadata).")
@click.pass_context
def show_cmd(ctx, ref, as_json):
    """Show one version: digest, size, aliases, verdict, metrics, params and how it was made.

    A release model (or its verdict) that carries a scorecard prints it as a table: exact match and perplexity
    of base, adapter, merged and quantized per task and split, retention and the quantized accuracy drop.
    """
    with _open(ctx) as reg:
        v = reg.get(ref)
    if as_json:
        _echo_json(v.to_dict())
        return
    lines = [
        f"{v.ref}  ({v.kind})", f"  digest    sha256:{v.digest}", f"  size      {_size(v.size)} in {v.files} files",
        f"  aliases   {', '.join(v.aliases) or '-'}", f"  verdict   {_verdict_text(v)}"
        + (f" (from {v.verdict['source']})" if v.verdict and v.verdict["source"] else ""),
        f"  metrics   {json.dumps(v.metrics, sort_keys=True)}", f"  params    {json.dumps(v.params, sort_keys=True)}",
        f"  tags      {', '.join(v.tags) or '-'}", f"  source    {v.source}", f"  created   {_when(v.created_at)}",
        f"  metadata  {', '.join(sorted(v.metadata)) or '-'}",
    ]
    card = v.metadata.get("scorecard.json")
    if isinstance(card, dict) and isinstance(card.get("tasks"), dict):
        from lorakit.scorecard.report import render_text

        lines += ["", "scorecard (the gate judges val; test is reported only)", render_text(card)]
    click.echo("\n".join(lines))


@registry_group.command("lineage")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print the tree as nested JSON.")
@click.pass_context
def lineage_cmd(ctx, ref, as_json):
    """Show what REF was made from, as a tree, with the parameters of each step."""
    with _open(ctx) as reg:
        tree = reg.lineage(ref)
    if as_json:
        _echo_json(tree.to_dict())
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.tree import Tree

    def label(node) -> str:
        a = node.artifact
        text = f"[bold]{a.ref}[/] [dim]{a.kind} sha256:{a.digest[:12]}[/]"
        if node.params:
            text += " " + escape(f"<- {json.dumps(node.params, sort_keys=True)}")
        return text

    def add(branch, node) -> None:
        for parent in node.parents:
            add(branch.add(label(parent)), parent)

    root = Tree(label(tree))
    add(root, tree)
    Console().print(root)


@registry_group.command("register")
@click.argument("path", type=click.Path())
@click.option("--name", required=True, help="Artifact name (letters, digits, '.', '_', '-'; at most 64).")
@click.option("--kind", required=True, type=click.Choice(_KINDS), help="What the folder holds.")
@click.option("--parent", "parents", multiple=True, metavar="REF", help="An artifact this one was made from (repeat).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="A parameter of the step that made it.")
@click.option("--metric", "metrics", multiple=True, metavar="KEY=NUMBER", help="A metric (ppl=14.8, degradation=0.02).")
@click.option("--tag", "tags", multiple=True, help="A free-form tag (repeat).")
@click.option("--verdict", help="Its gate verdict: a gate output folder, a gate.json, or a registered verdict REF.")
@click.option("--json", "as_json", is_flag=True, help="Print the registered version as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def register_cmd(ctx, path, name, kind, parents, params, metrics, tags, verdict, as_json, quiet):
    """Store the folder PATH as the next version of NAME (identical content returns the existing version).

    The lorakit_*.json / prep.json / gate.json files found in PATH are kept as metadata. A --kind verdict
    folder registered with one --parent becomes that parent's gate verdict.
    """
    with _open(ctx) as reg:
        v = reg.register(path, name=name, kind=kind, parents=list(parents), params=_pairs(params, "param", False),
                         metrics=_pairs(metrics, "metric", True), tags=tags, verdict=verdict, progress=not quiet)
    if as_json:
        _echo_json(v.to_dict())
    else:
        click.echo(f"{'registered' if v.created else 'already registered as'} {v.ref} (sha256:{v.digest[:12]})")


@registry_group.command("alias")
@click.argument("ref")
@click.argument("alias")
@click.pass_context
def alias_cmd(ctx, ref, alias):
    """Point NAME@ALIAS at the version REF names (recorded; production is set by `promote`)."""
    with _open(ctx) as reg:
        move = reg.set_alias(ref, alias)
    prev = f" (was @{move.previous_version})" if move.previous_version else ""
    click.echo(f"{move.name}@{move.alias} -> {move.name}@{move.version}{prev}")


@registry_group.command("promote")
@click.argument("ref")
@click.option("--force", is_flag=True, help="Promote without a passing gate verdict (needs --reason).")
@click.option("--reason", help="Why; recorded in the alias history.")
@click.pass_context
def promote_cmd(ctx, ref, force, reason):
    """Give REF the production alias. Refused (exit 3) unless its gate verdict passed or --force --reason."""
    with _open(ctx) as reg:
        move = reg.promote(ref, force=force, reason=reason)
    note = f" FORCED: {move.reason}" if move.forced else ""
    click.echo(f"{move.name}@production -> {move.name}@{move.version}{note}")


@registry_group.command("history")
@click.argument("name")
@click.option("--alias", help="Only this alias.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def history_cmd(ctx, name, alias, as_json):
    """Every alias move of NAME: when, by whom, from which version, forced or not, and why."""
    from dataclasses import asdict

    with _open(ctx) as reg:
        moves = reg.alias_history(name, alias)
    if as_json:
        _echo_json([asdict(m) for m in moves])
        return
    for m in moves:
        prev = f"@{m.previous_version}" if m.previous_version else "-"
        forced = f" FORCED ({m.reason})" if m.forced else (f" ({m.reason})" if m.reason else "")
        click.echo(f"{_when(m.at)}  {m.name}@{m.alias}: {prev} -> @{m.version}  by {m.actor}{forced}")


@registry_group.command("resolve")
@click.argument("ref")
@click.pass_context
def resolve_cmd(ctx, ref):
    """Print the verified, loadable folder of REF (read-only: do not edit files in it)."""
    with _open(ctx) as reg:
        click.echo(str(reg.resolve(ref)))


@registry_group.command("verify")
@click.argument("ref", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def verify_cmd(ctx, ref, as_json):
    """Re-hash stored files (of REF, or everything) and check the index. Exit 1 if anything is corrupt."""
    from dataclasses import asdict

    from lorakit.errors import LorakitError

    with _open(ctx) as reg:
        report = reg.verify(ref)
    if as_json:
        _echo_json(asdict(report))
    else:
        click.echo(f"checked {report.artifacts} versions, {report.blobs} blobs: "
                   + ("ok" if report.ok else f"{len(report.problems)} problems"))
        for p in report.problems:
            click.echo(f"  CORRUPT {p}")
        if report.orphan_blobs or report.temporaries:
            click.echo(f"  {len(report.orphan_blobs)} unreferenced blobs, {report.temporaries} leftovers of interrupted "
                       "writes (harmless; lorakit registry gc removes them)")
    if not report.ok:
        raise LorakitError("the registry holds corrupt data (listed above); re-register affected artifacts from "
                           "their source folders", exit_code=1)


@registry_group.command("gc")
@click.option("--dry-run", is_flag=True, help="Only report what would be removed.")
@click.option("--wait", default=0.0, show_default=True, help="Seconds to wait for writers to finish.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def gc_cmd(ctx, dry_run, wait, as_json):
    """Remove blobs no version references and leftovers of interrupted writes (never while others write)."""
    from dataclasses import asdict

    with _open(ctx) as reg:
        report = reg.gc(dry_run=dry_run, wait_s=wait)
    if as_json:
        _echo_json(asdict(report))
        return
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{verb} {len(report.blobs)} blobs ({_size(report.freed_bytes)}), {report.temporaries} temporaries, "
               f"{len(report.checkouts)} stale checkouts")


@registry_group.command("export")
@click.argument("ref")
@click.option("-o", "--output", required=True, type=click.Path(), help="Folder to create (must not exist).")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.pass_context
def export_cmd(ctx, ref, output, force):
    """Copy REF's exact files into a new folder (verified while copying; atomic)."""
    with _open(ctx) as reg:
        out = reg.export(ref, output, force=force)
    click.echo(str(out))


COMMANDS = [registry_group]
