"""Every measured figure in the README, docs/ and the run configs cites the result file a bench script wrote.

The citation convention (docs and README: an HTML comment, invisible when rendered; YAML: a parenthesis):

    115 MB<!-- bench/results/quantize.json: runs.lorakit-gptq-4b-g64-sym.size_mb -->
    +3.41% (bench/results/pipeline.json: verdict)

The citation follows its figure directly (only spaces, backticks or `*` between). The key path is dotted; a list
element is its index (``trials.1.ppl``); ``/N`` or ``*N`` at the end scales the field (``bf16_bytes/1e6`` for MB).
A figure ending in ``%`` shows a fraction ×100. A numeric field must equal the figure at the figure's own rounding
(``+3.4%`` matches 0.0341 but not 0.0351); a text field must contain the figure as written (``+3.41%`` in a
verdict line). So a bench re-run that moves a number, or a result file that loses the field, fails here until the
prose is updated. Files without any figure pass: text from other branches needs no citation unless it says
"measured".
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import REPO

CITE = re.compile(r"(?:<!--\s*|\()`?bench/results/(?P<file>[\w.-]+\.json)`?:\s*(?P<key>[^\s()>]+?)\s*(?:-->|\))")
FIGURE = re.compile(r"(?P<num>[-+−]?\d+(?:,\d{3})*(?:\.\d+)?)\s*(?P<unit>%|×|x|s|MB|GB|MiB|GiB|min)?[\s`*]*$")
MEASURED = re.compile(r"\bmeasured\b", re.I)
UNIT_FIGURE = re.compile(r"\d(?:\.\d+)?\s?(?:%|×|x\b|MB|GB|MiB|GiB|s\b|min\b)")


def documents() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "configs").glob("*.yaml"))]


def resolve(data, key: str):
    """The field at a dotted key path, scaled by a trailing /N or *N."""
    scale = re.match(r"^(?P<path>.+?)(?P<op>[*/])(?P<n>[\d.e+]+)$", key)
    path = scale["path"] if scale else key
    value = data
    for part in path.split("."):
        if isinstance(value, list) and part.isdigit():
            value = value[int(part)]
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            raise KeyError(f"no field {part!r} on the way to {path!r}")
    if scale:
        n = float(scale["n"])
        value = value * n if scale["op"] == "*" else value / n
    return value


def check_figure(figure: str, value) -> str | None:
    """None when ``figure`` (text as shown) agrees with the cited field ``value``; else why not."""
    m = FIGURE.search(figure)
    if m is None:
        return f"no figure right before the citation (text ends {figure[-40:]!r})"
    shown = m.group(0).strip(" `*")
    if isinstance(value, str):
        return None if shown in value else f"{shown!r} does not occur in the cited text {value!r}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"the cited field is {value!r}, not a number or text"
    num = m["num"].replace("−", "-").replace(",", "")
    decimals = len(num.split(".")[1]) if "." in num else 0
    expected = value * 100 if m["unit"] == "%" else value
    if (num[0] == "-" and expected > 0) or (num[0] == "+" and expected < 0):
        return f"{shown} has the wrong sign for {value!r}"
    if abs(abs(float(num)) - abs(expected)) > 0.5 * 10 ** -decimals + 1e-9 * abs(expected):
        return f"{shown} does not match the cited value {value!r} (shown at this rounding: {expected:+.{decimals}f})"
    return None


def citations(text: str):
    """(line number, figure text, file, key) for every citation in ``text``."""
    for m in CITE.finditer(text):
        line_start = text.rfind("\n", 0, m.start()) + 1
        yield text.count("\n", 0, m.start()) + 1, text[line_start:m.start()], m["file"], m["key"]


def problems_in(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    out = []
    for lineno, figure, file, key in citations(text):
        where = f"{path.relative_to(REPO)}:{lineno}"
        results = REPO / "bench" / "results" / file
        if not results.exists():
            out.append(f"{where}: cites bench/results/{file}, which does not exist")
            continue
        try:
            value = resolve(json.loads(results.read_text()), key)
        except (KeyError, IndexError, TypeError) as exc:
            out.append(f"{where}: bench/results/{file}: {exc}")
            continue
        why = check_figure(figure, value)
        if why:
            out.append(f"{where}: {why} (bench/results/{file}: {key})")
    return out


@pytest.mark.parametrize("path", documents(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_cited_figure_matches_its_result_file(path):
    assert problems_in(path) == []


@pytest.mark.parametrize("path", [REPO / "README.md", REPO / "configs" / "default.yaml"], ids=lambda p: p.name)
def test_a_line_that_says_measured_cites_a_result(path):
    """A paragraph (or YAML line) that says "measured" next to a figure with a unit cites a result file."""
    text = path.read_text(encoding="utf-8")
    blocks = text.splitlines() if path.suffix == ".yaml" else re.split(r"\n\s*\n", text)
    bad = [b.strip()[:120] for b in blocks if MEASURED.search(b) and UNIT_FIGURE.search(b) and not CITE.search(b)]
    assert bad == []


def test_the_checker_rejects_stale_and_accepts_current_figures():
    """The checker itself, on made-up values: a figure off by more than its rounding fails, and so do sign flips."""
    assert check_figure("passed at +3.4%", 0.0341) is None
    assert check_figure("passed at +3.4%", 0.0351) is not None
    assert check_figure("passed at −2.3%", 0.023) is not None  # stale sign
    assert check_figure("a 115 MB", 114.6) is None
    assert check_figure("a 114.6 MB", 114.0) is not None
    assert check_figure("1.1x", 1.112) is None
    assert check_figure("speed 19.7×", 18.2) is not None
    assert check_figure("+3.41%", "gate passed: degradation +3.41% <= 5.00%") is None
    assert check_figure("+3.4%", "gate passed: degradation +3.41% <= 5.00%") is not None  # text: exact
    assert check_figure("+5.2%", "gate passed: degradation +3.41% <= 5.00%") is not None
    assert check_figure("no number here", 1.0) is not None
    data = {"runs": {"a-b": {"size_bytes": 269045204}}, "trials": [{"ppl": 3.2}, {"ppl": 3.1996}]}
    assert resolve(data, "runs.a-b.size_bytes/1e6") == pytest.approx(269.045204)
    assert resolve(data, "trials.1.ppl") == 3.1996
    with pytest.raises(KeyError):
        resolve(data, "runs.missing")
    found = list(citations("size 115 MB<!-- bench/results/q.json: a.b --> and +1%  (bench/results/r.json: c)\n"))
    assert [(f, k) for _, _, f, k in found] == [("q.json", "a.b"), ("r.json", "c")]
    assert found[0][1].endswith("115 MB")
