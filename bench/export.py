"""GGUF export benchmark: size, export time and perplexity per GGUF type beside the fp32 model, in one run.

Model: the embedded default SmolLM2-135M-Instruct (fp32 HF folder). Each type is written by ``lorakit export
--format gguf`` (in this process, ``lorakit.export.export_gguf``) and read back by transformers' GGUF loader, which
dequantizes it; perplexity is ``lorakit.evaluate`` (the gate's method: the fp32 model's tokenizer, documents joined
by EOS, non-overlapping 512-token windows) on the first ``EVAL_TOKENS`` tokens of held-out English text, the
docstrings of a fixed list of Python standard-library modules (present wherever Python 3.11 is). The slow test
``tests/test_export_slow.py`` measures the same stream and asserts the Q4_0 band recorded here.

GPTQ/AWQ are not re-measured here; their sizes and perplexities on SmolLM2 are in ``bench/results/quantize.json``
(a different perplexity text and method, so not comparable digit for digit).

With ``--release DIR`` (the output folder of a ``lorakit run`` of the default release, e.g. what
``bench/pipeline.py`` keeps in ``bench/work/pipeline/out``) the source is that release's merged model instead, and
GPTQ and AWQ are measured beside the GGUF types on the same token stream: the release's own GPTQ checkpoint (the
release default) and a lorakit AWQ 4-bit g64 checkpoint calibrated on the release's calibration data. Those rows
are recorded under the ``release`` key, leaving the embedded model's rows (which the slow test checks) as they are.

Usage: python bench/export.py [--types f16,q8_0,q4_0,q5_0,q5_1] [--work bench/work/export] [--release DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

EVAL_MODULES = ["decimal", "fractions", "statistics", "random", "heapq", "bisect", "textwrap", "string", "difflib",
                "calendar"]
EVAL_TOKENS = 4096
SEQ_LEN = 512
TYPES = ("f16", "q8_0", "q4_0", "q5_0", "q5_1")


def eval_texts() -> list[str]:
    """Docstrings (> 200 characters) of the public functions and classes of ``EVAL_MODULES``, in a fixed order."""
    from bench.common import stdlib_docstrings

    return stdlib_docstrings(EVAL_MODULES)


def cpu_info() -> dict:
    """CPU model, the flags that change which kernels run, and the load when measured."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return {"model": model, "flags": [f for f in wanted if f in flags], "cores": os.cpu_count(),
            "loadavg_1m_start": round(os.getloadavg()[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--work", default=str(BENCH / "work" / "export"))
    parser.add_argument("--release", type=Path, help="a `lorakit run` output folder: measure its merged model, its "
                        "GPTQ checkpoint and a lorakit AWQ checkpoint beside the GGUF types (key `release`)")
    args = parser.parse_args()

    from bench.common import update_readme_section, write_results
    from lorakit.evaluate import load_eval_model, load_tokenizer, perplexity
    from lorakit.evaluate.loading import describe_model
    from lorakit.evaluate.text import EvalTexts, tokenize_eval_texts
    from lorakit.export import export_gguf
    from lorakit.io.digests import sha256_file
    from lorakit.models import ensure_default_model
    from lorakit.runtime import configure_threads

    configure_threads()
    cpu = cpu_info()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    release = _release_parts(args.release) if args.release else None
    base = release["merged"] if release else ensure_default_model()
    spec = describe_model(str(base))
    tokens = tokenize_eval_texts(EvalTexts(eval_texts(), "python stdlib docstrings", "list", None),
                                 load_tokenizer(spec), max_tokens=EVAL_TOKENS)
    rows = []

    def measure(ref: str, label: str, extra: dict) -> dict:
        t0 = time.perf_counter()
        loaded = load_eval_model(describe_model(ref), device="cpu")
        load_s = time.perf_counter() - t0
        r = perplexity(loaded, tokens, seq_len=SEQ_LEN, progress=False)
        row = {"type": label, "ppl": r.ppl, "tokens_scored": r.tokens, "load_s": round(load_s, 2),
               "path_used": r.path_used, **extra}
        print(row, flush=True)
        return row

    fp32_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    rows.append(measure(str(base), "fp32", {"size_bytes": fp32_bytes, "export_s": 0.0, "file": "model.safetensors"}))
    for qtype in args.types.split(","):
        out = work / f"{base.name}.{qtype}.gguf"
        result = export_gguf(base, out, qtype=qtype, force=True, progress=False)
        rows.append(measure(str(out), qtype, {"size_bytes": out.stat().st_size,
                                              "export_s": result.metadata["wall_time_s"],
                                              "tensor_types": result.metadata["tensor_types"],
                                              "sha256": sha256_file(out)}))
    if release:
        rows.append(measure(str(release["gptq"]), "gptq (release)", _quant_extra(release["gptq"])))
        from lorakit.quantize import quantize_model

        awq_dir = work / "awq-4b-g64"
        quantize_model(base, awq_dir, method="awq", bits=4, group_size=64, calib=release["calib"], n_samples=64,
                       seq_len=256, calib_general=None, force=True, progress=False)
        rows.append(measure(str(awq_dir), "awq 4b g64 (lorakit)", _quant_extra(awq_dir)))
    ref_ppl = rows[0]["ppl"]
    for row in rows:
        row["degradation"] = row["ppl"] / ref_ppl - 1
    cpu["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    if release:
        from bench.common import machine

        path = BENCH / "results" / "export.json"
        data = json.loads(path.read_text())
        data["release"] = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "cpu": cpu,
                           "source": str(args.release), "merged": str(base),
                           "perplexity_method": {**{k: v for k, v in tokens.describe().items() if k != "join"},
                                                 "seq_len": SEQ_LEN, "stride": SEQ_LEN, "modules": EVAL_MODULES},
                           "rows": rows}
        path.write_text(json.dumps(data, indent=2) + "\n")
        update_readme_section("export-release", _release_table(rows, fp32_bytes, cpu))
        print(f"wrote {path} (key release)", flush=True)
        return
    data = {
        "model": "SmolLM2-135M-Instruct (embedded default, fp32 HF folder)",
        "cpu": cpu, "torch_threads": int(os.environ.get("LORAKIT_THREADS", "0") or 0) or "lorakit default",
        "perplexity_method": {**{k: v for k, v in tokens.describe().items() if k != "join"}, "seq_len": SEQ_LEN,
                              "stride": SEQ_LEN, "modules": EVAL_MODULES, "evaluator": "lorakit.evaluate.perplexity"},
        "reader": "transformers AutoModelForCausalLM.from_pretrained(dir, gguf_file=...) (dequantizes to fp32)",
        "gptq_awq": "not measured in this run; see bench/results/quantize.json (other text and method)",
        "rows": rows,
    }
    path = write_results("export", data)
    table = ["| type | size MB | vs fp32 size | export s | ppl | vs fp32 |", "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        table.append(f"| {row['type']} | {row['size_bytes'] / 1e6:.1f} | {row['size_bytes'] / fp32_bytes:.0%} | "
                     f"{row['export_s']:.1f} | {row['ppl']:.4f} | {row['degradation']:+.2%} |")
    update_readme_section("export", f"""## export

`python bench/export.py` → `{path.relative_to(BENCH.parent)}`. SmolLM2-135M-Instruct (the embedded default, fp32)
written by `lorakit export --format gguf --type T`, read back by transformers' GGUF loader; perplexity with
`lorakit.evaluate` (the gate's method, 512-token non-overlapping windows) on the first {EVAL_TOKENS} tokens of
Python stdlib docstrings ({', '.join(EVAL_MODULES[:3])}, …). For q4_0/q5_0/q5_1 the tied embedding (also the logits
layer) is stored as q8_0; RMSNorm weights stay f32. CPU: {cpu['model']} ({', '.join(cpu['flags'])}), {cpu['cores']}
cores, load {cpu['loadavg_1m_start']} → {cpu['loadavg_1m_end']}. GPTQ/AWQ on the same model: `## quantize` (other
text and method, so compare the "vs fp32" columns only loosely).

{chr(10).join(table)}
""")
    print(f"wrote {path}", flush=True)


def _release_parts(out_dir: Path) -> dict[str, Path]:
    """The merged model, the GPTQ checkpoint and the calibration data of one `lorakit run` output folder."""
    from bench.common import find_one

    return {"merged": find_one(out_dir, "merged/model-*", dirs=True),
            "gptq": find_one(out_dir, "quantized/gptq-*", dirs=True),
            "calib": find_one(out_dir, "prep/calibration-*", dirs=True)}


def _quant_extra(folder: Path) -> dict:
    from lorakit.quantize import read_quant_meta

    meta = read_quant_meta(folder)
    return {"size_bytes": meta.size_after_bytes, "export_s": meta.wall_time_s, "settings": meta.used_settings()}


def _release_table(rows: list[dict], fp32_bytes: int, cpu: dict) -> str:
    table = ["| format | size MB | vs fp32 size | made in s | ppl | vs fp32 |", "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        table.append(f"| {row['type']} | {row['size_bytes'] / 1e6:.1f} | {row['size_bytes'] / fp32_bytes:.0%} | "
                     f"{row['export_s']:.1f} | {row['ppl']:.4f} | {row['degradation']:+.2%} |")
    return f"""## export of the default release: GGUF beside GPTQ and AWQ

`python bench/export.py --release bench/work/pipeline/out` (→ `bench/results/export.json`, key `release`): the
default release's merged model (fp32), each GGUF type, the release's own GPTQ checkpoint and a lorakit AWQ 4-bit g64
checkpoint calibrated on the release's calibration data, all scored on one token stream ({EVAL_TOKENS} tokens of
Python stdlib docstrings, the gate's method; GPTQ/AWQ on lorakit's dequantized path). CPU: {cpu['model']}
({', '.join(cpu['flags'])}), load {cpu['loadavg_1m_start']} → {cpu['loadavg_1m_end']}. "made in s" is the export or
quantization wall time (GPTQ's from the release run itself, `bench/pipeline.py --cpu-profile avx2`).

{chr(10).join(table)}
"""


if __name__ == "__main__":
    main()
