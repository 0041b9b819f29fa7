"""GPTQ's calibration batch: how many calibration blocks GPTQModel runs per forward call while it replays each layer.

lorakit calls GPTQModel's ``quantize`` with ``batch_size =``
:data:`lorakit.quantize.gptqmodel_backend.CALIB_BATCH_SIZE`. Every block has the same length (no padding), so the
Hessians sum the same tokens at any batch size; only the order of the floating-point sums changes. This benchmark
quantizes a default release's merged model with the release's own settings (``lorakit.quantize.options``) once
per batch size, one after another in one process (run it on a quiet machine), and records for each:

- the wall time of the quantization (``quantize_s``) and its ratio to the first batch size's;
- the release gate's checks against the merged model (``lorakit.gate.check``: perplexity and mean KL on each
  task's val split and on the gate's general text), and exact match on every val and test question of each task
  with its drop against the merged model (``bench/calibration_mix.py``'s ``measure``, the same measurement);
- the share of 4-bit codes identical to the first batch size's. GPTQ with act-order quantizes columns in the
  order of the Hessian's diagonal and carries each column's rounding error into the next ones, so a last-bit
  change in a sum can reorder columns and change many codes of an equally good result: the checks above, not
  the codes, say whether the quantization is as good.

Usage: python bench/gptq_batch.py --release OUT [--batches 1,4] [--work bench/work/gptq_batch]
Writes bench/results/gptq_batch.json and the ``gptq_batch`` section of bench/README.md.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from bench.calibration_mix import Variant, accuracy, measure  # noqa: E402
from bench.common import cpu_line, machine, release_parser, release_quant_inputs, update_readme_section, write_results  # noqa: E402

NAME = "gptq_batch"


def release_variant() -> Variant:
    """The release's quantization (``lorakit.quantize.options.QUANTIZE``, its conventions resolved) as a
    ``calibration_mix`` variant, so this benchmark follows the default wherever it moves."""
    from lorakit.quantize.options import QUANTIZE, resolve_gptaq, resolve_grid

    q = QUANTIZE
    if q.method != "gptq":
        raise SystemExit(f"the release quantizes with {q.method}; CALIB_BATCH_SIZE is GPTQ's (GPTQModel's) setting")
    sym, desc_act = resolve_grid(q.method, q.sym, q.desc_act)
    return Variant(q.method, q.calib_general_fraction, bits=q.bits, group_size=q.group_size, n_samples=q.n_samples,
                   asym=not sym, act_order=desc_act, gptaq_alpha=resolve_gptaq(q.method, q.gptaq_alpha),
                   clip=q.clip_search)


def codes(folder: Path) -> dict:
    """Every quantized layer's 4-bit codes, unpacked from the GPTQ v1 ``qweight`` words (8 codes per int32)."""
    import torch
    from safetensors.torch import load_file

    shifts = torch.arange(0, 32, 4, dtype=torch.int32).view(1, -1, 1)
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        for key, t in load_file(f).items():
            if key.endswith(".qweight"):
                out[key] = (t.unsqueeze(1) >> shifts) & 15
    return out


def same_codes(a: dict, b: dict) -> float:
    same = sum(int((a[k] == b[k]).sum()) for k in a)
    return same / sum(t.numel() for t in a.values())


def readme(data: dict) -> str:
    rows = list(data["by_batch"].values())
    first = rows[0]
    checks = list(first["checks"])
    tasks = list(first["accuracy"])
    lines = [f"## {NAME}", "",
             f"`python bench/gptq_batch.py --release {data['release']}`: the default release's merged model quantized "
             "with the release's settings, GPTQModel running this many calibration blocks per forward call "
             "(`CALIB_BATCH_SIZE` in `lorakit/quantize/gptqmodel_backend.py`), one after another in one process; "
             "judged by the release gate against the merged model (perplexity change / mean KL) and by exact match "
             "on every val and test question (points lost against the merged model). "
             f"CPU: {cpu_line(data['machine'].get('cpu'))}; load average at the end {data['machine'].get('loadavg_1m_at_end')}.", "",
             "| blocks per call | quantize s | speed-up | codes as at " + str(first["batch_size"]) + " | "
             + " | ".join(f"{c} ppl / KL" for c in checks) + "".join(f" | {t} drop val / test" for t in tasks) + " |",
             "|---|---|---|---|" + "---|" * (len(checks) + len(tasks))]
    for r in rows:
        cells = [f"{r['checks'][c]['degradation']:+.1%} / {r['checks'][c]['kl_mean']:.3f}" for c in checks]
        cells += [" / ".join(f"{100 * r['accuracy'][t][s]['drop']:+.1f}" for s in r["accuracy"][t]) for t in tasks]
        lines.append(f"| {r['batch_size']} | {r['quantize_s']:.0f} | {r['speedup_vs_first']:.2f}x | "
                     f"{r['same_codes_as_first']:.1%} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = release_parser(__doc__)
    ap.add_argument("--batches", default="1,4", help="calibration blocks per forward call, comma-separated; the "
                    "first is the reference of the speed-up and of the code comparison")
    ap.add_argument("--work", type=Path, default=BENCH / "work" / NAME)
    args = ap.parse_args()
    import lorakit.quantize.gptqmodel_backend as backend
    from lorakit.runtime import configure_threads

    configure_threads()
    merged, calib, preps = release_quant_inputs(args.release)
    variant = release_variant()
    merged_accuracy = accuracy(merged, preps, None)
    print("merged", merged_accuracy, flush=True)
    data = {"release": str(args.release), "merged": str(merged), "variant": variant.key(),
            "default_batch_size": backend.CALIB_BATCH_SIZE, "merged_accuracy": merged_accuracy, "by_batch": {}}
    reference = None
    for b in [int(x) for x in args.batches.split(",")]:
        backend.CALIB_BATCH_SIZE = b
        row = measure(merged, calib, preps, variant, args.work / f"batch{b}", merged_accuracy, None)
        folder = args.work / f"batch{b}" / variant.key()
        mine = codes(folder)
        reference = reference or (row["quantize_s"], mine)
        row.update(batch_size=b, speedup_vs_first=round(reference[0] / row["quantize_s"], 3),
                   same_codes_as_first=same_codes(reference[1], mine))
        data["by_batch"][str(b)] = row  # citable by key path: by_batch.4.quantize_s
        print(b, row["quantize_s"], {k: round(c["degradation"], 4) for k, c in row["checks"].items()}, flush=True)
    data["machine"] = machine()  # with the load average at the end
    write_results(NAME, data)
    update_readme_section(NAME, readme(data))


if __name__ == "__main__":
    main()
