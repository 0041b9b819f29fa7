"""Calibration on the tasks alone vs a mix with general text, GPTQ vs AWQ, on the default release (issue 12, item 5).

Given the output folder of a ``lorakit run`` of the default release, each variant quantizes the release's merged
model (4-bit, group 64, the release's calibration size) and is then judged by the release gate itself
(``lorakit.gate.check``): perplexity degradation and mean KL(merged || quantized) on every task's val split and on
the first 8192 tokens of the shipped general-English corpus. Calibration's general blocks come from the corpus's
last documents, so the gate's general text never shaped the weights.

A variant ``method:fraction:b8`` quantizes to 8 bits instead of 4; ``method:fraction:g32`` uses group 32 instead of
64; ``gptq:fraction:asym`` adds a zero point and ``gptq:fraction:act`` act-order (desc_act); ``awq:fraction:activation`` searches AWQ's activation-only scale form instead of the default ``duo``
(``lorakit.quantize.awq.search_scale``); ``gptq:fraction:gptaqA`` turns on GPTAQ with alpha A and ``gptq:fraction:clip``
GPTQModel's clipping search (without them a GPTQ variant is plain GPTQ, as in every record made before the options
existed; AWQ variants always search clipping). A variant ``method:fraction:kN`` also keeps the N most sensitive linears (``lorakit.quantize.sensitivity``, ranked
on the same calibration blocks) at the method's higher precision (AWQ: fp16), as the search's second phase does:
what per-module precision buys on general text, and what it costs in size. A variant ``method:fraction:sN``
calibrates on N blocks instead of the release's ``n_samples``, and ``:seedN`` draws the task blocks with seed N instead of
the release's (how far the accuracy drop moves with the draw alone). ``:fp32`` (or ``:bf16``) forces the dtype the model
runs in while it is calibrated (default: the machine's, ``lorakit.compute``; a CPU without bfloat16 units gets float32).
``:keep-KIND`` (e.g. ``:keep-k_proj``, repeatable) leaves that kind of linear unquantized in every layer (GPTQ: stored
as plain weights and named out of ``modules_in_block_to_quantize``; the file stays loadable by plain transformers).

With ``--accuracy`` each variant is also scored as the release scorecard scores it: greedy exact match on the first
``scorecard.max_examples`` examples of every task's val and test split, and its drop against the merged model's
(scored once) -- the gate's ``max_accuracy_drop`` and item 7's "within 2 points", which perplexity cannot show.

Usage: python bench/calibration_mix.py --release OUT [--work bench/work/calibration_mix] [--variants gptq:0,awq:0.5:k16]
       [--accuracy] [--results calibration_mix]
Writes bench/results/RESULTS.json and the ``RESULTS`` section of bench/README.md. Variants measured on another
release's merged model are not carried into a results file: every row of one file is the same merged model.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from bench.common import (bf16_bytes, cpu_line, release_parser, release_quant_inputs,  # noqa: E402
                          update_readme_section, write_results)

DEFAULT_VARIANTS = "gptq:0,gptq:0.5,awq:0,awq:0.5"


def sensitive_modules(merged: Path, calib: Path, q: dict, fraction: float, keep: int) -> dict[str, int]:
    """The ``keep`` linears with the largest RTN output error on the calibration blocks, at the method's higher bits."""
    from lorakit.quantize.calibration import build_calibration
    from lorakit.quantize.core import _load_tokenizer
    from lorakit.quantize.mixed import KEEP_BITS
    from lorakit.quantize.sensitivity import module_sensitivity

    blocks = build_calibration(calib, _load_tokenizer(merged), n_samples=q["n_samples"], seq_len=q["seq_len"],
                               seed=q["seed"], general="default" if fraction else None,
                               general_fraction=fraction).blocks
    sym = q["sym"] if q["sym"] is not None else q["method"] == "gptq"
    sens = module_sensitivity(merged, blocks, bits=q["bits"], group_size=q["group_size"], sym=sym)
    return {m: KEEP_BITS[q["method"]] for m in sens.ranking[:keep]}


def unquantized_bits(merged: Path, kinds: tuple[str, ...]) -> dict[str, int]:
    """Every layer's linear of each kind (``k_proj`` = ``self_attn.k_proj``), left unquantized (16)."""
    from lorakit.quantize.checks import QUANTIZED_LINEARS

    n_layers = json.loads((merged / "config.json").read_text())["num_hidden_layers"]
    full = []
    for kind in kinds:
        match = [lin for lin in QUANTIZED_LINEARS if lin.endswith(f".{kind}")]
        if len(match) != 1:
            raise SystemExit(f"keep-{kind}: not a linear kind; use one of "
                             + ", ".join(lin.split(".")[-1] for lin in QUANTIZED_LINEARS))
        full.append(match[0])
    return {f"model.layers.{i}.{lin}": 16 for i in range(n_layers) for lin in full}


def accuracy(model: Path, preps: list[Path], max_examples: int | None) -> dict[str, dict[str, float]]:
    """{task: {split: exact match}} on the splits the release scorecard scores, their first ``max_examples``."""
    from lorakit.data.splits import pick_report_split
    from lorakit.evaluate import task_accuracy

    out: dict[str, dict[str, float]] = {}
    for prep in preps:
        report, _ = pick_report_split(prep)
        out[task_name(prep)] = {s: task_accuracy(str(model), str(prep), split=s, max_examples=max_examples,
                                                 progress=True).exact_match
                                for s in dict.fromkeys(("val", report))}
    return out


def task_name(prep: Path) -> str:
    return prep.name.rsplit("-", 1)[0]  # prep/<task>-<hash>


DTYPE_TOKENS = {"fp32": "float32", "bf16": "bfloat16"}  # `:fp32` forces the compute dtype (default: the machine's)
DTYPE_KEYS = {v: k for k, v in DTYPE_TOKENS.items()}


@dataclass(frozen=True)
class Variant:
    """One quantization to measure, parsed from
    ``method:fraction[:kN][:bN][:gN][:sN][:seedN][:FORM][:asym][:act][:gptaqA][:clip][:fp32|:bf16][:keep-KIND]
    [:tuneN][:tlrX]``."""

    method: str
    fraction: float
    keep: int = 0  # the N most sensitive linears at the method's higher precision
    bits: int = 4
    group_size: int = 64
    n_samples: int | None = None  # calibration blocks; None = the release's
    scale_form: str | None = None  # AWQ's per-group scale form
    asym: bool = False  # GPTQ: a zero point
    act_order: bool = False  # GPTQ: desc_act
    gptaq_alpha: float = 0.0  # GPTQ: GPTAQ's input-error correction (0 = plain GPTQ, as every record before it)
    clip: bool = False  # GPTQ: GPTQModel's clipping search (AWQ variants always search clipping, as before)
    compute_dtype: str | None = None  # forced compute dtype (fp32 | bf16); None = the machine's (lorakit.compute)
    seed: int | None = None  # calibration draw; None = the release's
    unquantized: tuple[str, ...] = ()  # linear kinds (k_proj, ...) left unquantized in every layer
    tune_steps: int = 0  # scale tuning after rounding (lorakit.quantize.tune); 0 = none, as every record before it
    tune_lr: float | None = None  # its learning rate; None = the quantize stage's default

    @classmethod
    def parse(cls, spec: str) -> Variant:
        from lorakit.quantize.options import AWQ_SCALE_FORMS

        method, fraction, *more = spec.split(":")

        def number(prefix: str, default):
            return next((int(m[1:]) for m in more if m.startswith(prefix) and m[1:].isdigit()), default)

        return cls(method, float(fraction), keep=number("k", 0), bits=number("b", 4), group_size=number("g", 64),
                   n_samples=number("s", None), scale_form=next((m for m in more if m in AWQ_SCALE_FORMS), None),
                   asym="asym" in more, act_order="act" in more,
                   gptaq_alpha=next((float(m[5:]) for m in more if m.startswith("gptaq")), 0.0),
                   clip="clip" in more,
                   compute_dtype=next((DTYPE_TOKENS[m] for m in more if m in DTYPE_TOKENS), None),
                   seed=next((int(m[4:]) for m in more if m.startswith("seed") and m[4:].isdigit()), None),
                   unquantized=tuple(sorted(m[len("keep-"):] for m in more if m.startswith("keep-"))),
                   tune_steps=next((int(m[4:]) for m in more if m.startswith("tune") and m[4:].isdigit()), 0),
                   tune_lr=next((float(m[3:]) for m in more if m.startswith("tlr")), None))

    @classmethod
    def of_record(cls, v: dict) -> Variant:
        """The variant a results record measured (records written before a field existed: its default)."""
        return cls(v["method"], v["general_fraction"], v.get("kept_modules", 0), v.get("bits", 4),
                   v.get("group_size", 64), v.get("n_samples"), v.get("awq_scale_form"), v.get("asym", False),
                   v.get("act_order", False), v.get("gptaq_alpha", 0.0), v.get("clip", False),
                   v.get("compute_dtype"), v.get("seed"), tuple(v.get("unquantized_kinds", ())),
                   v.get("tune_steps", 0), v.get("tune_lr"))

    def spec(self) -> str:
        """The ``--variants`` item that parses back to this variant: what a README section's command line repeats."""
        parts = [self.method, f"{self.fraction:g}"]
        parts += [f"{prefix}{value}" for prefix, value, default in (
            ("k", self.keep, 0), ("b", self.bits, 4), ("g", self.group_size, 64), ("s", self.n_samples, None),
            ("seed", self.seed, None)) if value != default]
        parts += [flag for flag, on in ((self.scale_form, bool(self.scale_form)), ("asym", self.asym),
                                        ("act", self.act_order), (f"gptaq{self.gptaq_alpha:g}", bool(self.gptaq_alpha)),
                                        ("clip", self.clip)) if on]
        return ":".join(parts + ([DTYPE_KEYS[self.compute_dtype]] if self.compute_dtype else [])
                        + [f"keep-{kind}" for kind in self.unquantized]
                        + ([f"tune{self.tune_steps}"] if self.tune_steps else [])
                        + ([f"tlr{self.tune_lr:g}"] if self.tune_lr is not None else []))

    def key(self) -> str:
        """``awq-g32-activation-general50-keep16``: no dots or colons, so a README figure can cite it by key path."""
        return (f"{self.method}{'' if self.bits == 4 else f'-{self.bits}bit'}"
                f"{'' if self.group_size == 64 else f'-g{self.group_size}'}"
                f"{f'-{self.scale_form}' if self.scale_form else ''}{'-asym' if self.asym else ''}"
                f"{'-act' if self.act_order else ''}{f'-gptaq{round(self.gptaq_alpha * 100)}' if self.gptaq_alpha else ''}"
                f"{'-clip' if self.clip and self.method == 'gptq' else ''}"
                f"{f'-{DTYPE_KEYS[self.compute_dtype]}' if self.compute_dtype else ''}"
                f"{f'-n{self.n_samples}' if self.n_samples else ''}"
                f"-general{round(self.fraction * 100)}" + (f"-keep{self.keep}" if self.keep else "")
                + ("" if self.seed is None else f"-seed{self.seed}")
                + "".join(f"-unquantized-{kind}" for kind in self.unquantized)
                + (f"-tune{self.tune_steps}" if self.tune_steps else "")
                + (f"-lr{self.tune_lr:.0e}" if self.tune_lr is not None else ""))


def measure(merged: Path, calib: Path, preps: list[Path], v: Variant, work: Path,
            merged_accuracy: dict | None = None, accuracy_examples: int | None = None) -> dict:
    from lorakit.quantize import quantize_model
    from lorakit.quantize.options import QUANTIZE

    q = {k: x for k, x in QUANTIZE.quantize_kwargs().items() if k not in ("calib_general", "calib_general_fraction")}
    q.update(method=v.method, bits=v.bits, sym=None if v.method == "awq" else q["sym"])  # AWQ: its default zero point
    q["group_size"] = v.group_size
    folder = work / v.key()
    if v.scale_form:
        q["awq_scale_form"] = v.scale_form
    if v.asym:
        q["sym"] = False
    if v.act_order:
        q["desc_act"] = True
    if v.n_samples:
        q["n_samples"] = v.n_samples
    if v.method == "gptq":
        q["gptaq_alpha"] = v.gptaq_alpha
        q["clip_search"] = v.clip
    if v.compute_dtype:
        q["compute_dtype"] = v.compute_dtype
    if v.seed is not None:
        q["seed"] = v.seed
    q["tune_steps"] = v.tune_steps
    if v.tune_lr is not None:
        q["tune_lr"] = v.tune_lr
    started = time.perf_counter()
    module_bits = sensitive_modules(merged, calib, q, v.fraction, v.keep) if v.keep else {}
    module_bits.update(unquantized_bits(merged, v.unquantized))
    result = quantize_model(merged, folder, calib=calib, calib_general="default" if v.fraction else None,
                            calib_general_fraction=v.fraction, module_bits=module_bits, force=True, progress=True, **q)
    quantize_s = time.perf_counter() - started
    gate_s, checks = gate_checks(merged, folder, preps)
    meta = result.metadata
    scored = accuracy_drops(folder, preps, merged_accuracy, accuracy_examples) if merged_accuracy is not None else {}
    return {"method": v.method, "bits": v.bits, "group_size": v.group_size, "general_fraction": v.fraction,
            **({"awq_scale_form": v.scale_form} if v.scale_form else {}),
            **({"asym": True} if v.asym else {}), **({"act_order": True} if v.act_order else {}),
            **({"gptaq_alpha": v.gptaq_alpha} if v.gptaq_alpha else {}),
            **({"clip": True} if v.clip and v.method == "gptq" else {}),
            **({"n_samples": v.n_samples} if v.n_samples else {}),
            **({"compute_dtype": v.compute_dtype} if v.compute_dtype else {}),
            **({"seed": v.seed} if v.seed is not None else {}),
            **({"unquantized_kinds": list(v.unquantized)} if v.unquantized else {}),
            **({"tune_steps": v.tune_steps, "tuning": meta["tuning"]} if v.tune_steps else {}),
            **({"tune_lr": v.tune_lr} if v.tune_lr is not None else {}),
            "kept_modules": v.keep, **scored,
            "quantize_used": meta["params"],
            "calibration": meta["calibration"], "size_mb": round(meta["size_after_bytes"] / 1e6, 1),
            "size_vs_bf16": round(meta["size_after_bytes"] / bf16_bytes(merged), 3),
            "quantize_s": round(quantize_s, 1), "gate_s": gate_s, "checks": checks}


def gate_checks(merged: Path, folder: Path, preps: list[Path]) -> tuple[float, dict]:
    """The release gate's perplexity checks of ``folder`` against the merged model (every task's val split and the
    general text), keyed by task: (gate seconds, {check: degradation, KL, top-1 agreement})."""
    from lorakit.gate import CheckSpec, check, general_check

    first, *others = [task_name(p) for p in preps]
    extra = [CheckSpec(name, str(p), 0.05, "task") for name, p in zip(others, preps[1:])]
    extra.append(general_check("default"))
    verdict = check(merged, folder, str(preps[0]), extra_checks=extra, seq_len=512, progress=True)
    return verdict.wall_s, {(first if c.kind == "primary" else c.name).replace(" ", "-"): {
        "kind": c.kind, "data": c.data, "tokens": c.tokens, "baseline_ppl": c.baseline_ppl,
        "candidate_ppl": c.candidate_ppl, "degradation": c.degradation,
        "kl_mean": c.distribution.get("kl_mean"), "kl_p99": c.distribution.get("kl_p99"),
        "top1_agreement": c.distribution.get("top1_agreement")} for c in verdict.checks}


def accuracy_drops(folder: Path, preps: list[Path], merged_accuracy: dict, examples: int | None) -> dict:
    """{"accuracy": {task: {split: exact match, the merged model's, and the drop}}} of ``folder``."""
    mine = accuracy(folder, preps, examples)
    return {"accuracy": {task: {s: {"exact_match": em, "merged": merged_accuracy[task][s],
                                    "drop": merged_accuracy[task][s] - em} for s, em in splits.items()}
                         for task, splits in mine.items()}}


def readme(data: dict, name: str) -> str:
    first = next(iter(data["variants"].values()))
    drops = [f"{task} EM drop val / test" for task in first.get("accuracy", {})]
    lines = [f"## {name}", "",
             f"`python bench/calibration_mix.py --release {data['release']}{data.get('command_tail', '')} --variants "
             + ",".join(Variant.of_record(v).spec() for v in data["variants"].values()) + "`: the "
             "default release's merged model, calibrated on the tasks alone or on a mix with general text, judged by "
             "the release gate (perplexity degradation vs the merged model; mean KL in nats)"
             + (" and by the scorecard's exact match (points lost vs the merged model, "
                + ("every example" if "accuracy_examples" in data and data["accuracy_examples"] is None
                   else f"first {data.get('accuracy_examples', 50)} examples") + ")" if drops else "") + ". Kept modules: the most sensitive linears at higher precision (AWQ fp16, "
             "GPTQ 8-bit). " + f"CPU: {cpu_line(data.get('machine', {}).get('cpu'))}.", "",
             "| method | bits | group | general share | kept modules | size MB (x bf16) | " + " | ".join(
                 f"{name} ppl / KL" for name in first["checks"]) + "".join(f" | {d}" for d in drops) + " |",
             "|---|---|---|---|---|---|" + "---|" * (len(first["checks"]) + len(drops))]
    for v in data["variants"].values():
        cells = [f"{c['degradation']:+.1%} / {c['kl_mean']:.3f}" for c in v["checks"].values()]
        cells += [" / ".join(f"{100 * s['drop']:+.1f}" for s in splits.values())
                  for splits in v.get("accuracy", {}).values()]
        flavour = [v.get("awq_scale_form"), "asym" if v.get("asym") else None, "act-order" if v.get("act_order") else None,
                   f"GPTAQ {v['gptaq_alpha']:g}" if v.get("gptaq_alpha") else None,
                   "clipping search" if v.get("clip") else None,
                   f"{v['n_samples']} blocks" if v.get("n_samples") else None,
                   f"computed in {v['compute_dtype']}" if v.get("compute_dtype") else None,
                   f"calibration seed {v['seed']}" if v.get("seed") is not None else None,
                   f"{', '.join(v['unquantized_kinds'])} unquantized" if v.get("unquantized_kinds") else None,
                   f"scales tuned {v['tune_steps']} steps" if v.get("tune_steps") else None]
        form = f" ({', '.join(filter(None, flavour))})" if any(flavour) else ""
        lines.append(f"| {v['method']}{form} | {v.get('bits', 4)} | {v.get('group_size', 64)} | {v['general_fraction']:.0%} | "
                     f"{v.get('kept_modules', 0)} | {v['size_mb']} ({v['size_vs_bf16']:.2f}) | "
                     + " | ".join(cells) + " |")
    from lorakit.gate.verdict import DEFAULT_MAX_KL

    kls = [c["kl_mean"] for v in data["variants"].values() for c in v["checks"].values()]
    under = sum(k <= DEFAULT_MAX_KL for k in kls)
    general = [v["checks"]["general-text"]["kl_mean"] for v in data["variants"].values()]
    lines += ["", f"The release gate's `max_kl` default is ln(1.05) = {DEFAULT_MAX_KL} nats (`lorakit/gate/verdict.py`): "
              "were the text the merged model's own samples, that mean KL would be exactly a 5% perplexity loss, so "
              f"it is the perplexity bar in KL terms. {under} of the {len(kls)} checks measured above are within it; "
              f"on general text {sum(k <= DEFAULT_MAX_KL for k in general)} of {len(general)}."]
    return "\n".join(lines)


def main() -> None:
    ap = release_parser(__doc__)
    ap.add_argument("--work", type=Path, default=BENCH / "work" / "calibration_mix")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help="method:general_fraction[:kN][:bN][:gN][:sN][:activation][:asym][:act][:gptaqA][:clip][:fp32|:bf16], "
                    "comma-separated (empty: rewrite the results and README section from what was measured)")
    ap.add_argument("--accuracy", action="store_true", help="also score exact match as the release scorecard does")
    ap.add_argument("--accuracy-examples", default=None, help="examples per split --accuracy scores: N or 'all' "
                    "(default: the scorecard's max_examples)")
    ap.add_argument("--results", default="calibration_mix", help="results file (bench/results/NAME.json) and README "
                    "section name")
    args = ap.parse_args()
    results = BENCH / "results" / f"{args.results}.json"
    from lorakit.runtime import configure_threads

    configure_threads()
    merged, calib, preps = release_quant_inputs(args.release)
    previous = json.loads(results.read_text()) if results.exists() else {}
    if previous.get("merged") not in (None, str(merged)):
        print(f"{results.name} holds another release's merged model ({previous['merged']}); starting it afresh")
        previous = {}
    variants = {Variant.of_record(v).key(): v for v in previous.get("variants", {}).values()}
    for v in variants.values():  # a record written before size_vs_bf16 and citable check keys existed
        v["checks"] = {name.replace(" ", "-"): c for name, c in v["checks"].items()}
        v.pop("size_vs_merged", None)
        v.setdefault("size_vs_bf16", round(v["size_mb"] * 1e6 / bf16_bytes(merged), 3))
    data = {"release": str(args.release), "merged": str(merged), "variants": variants,
            "command_tail": (" --accuracy" if args.accuracy else "")
            + ("" if args.results == "calibration_mix" else f" --results {args.results}")}
    merged_accuracy = None
    from lorakit.scorecard.options import SCORECARD

    n_acc = (None if args.accuracy_examples == "all" else int(args.accuracy_examples) if args.accuracy_examples
             else SCORECARD.max_examples)
    if args.accuracy:
        if previous.get("accuracy_examples", SCORECARD.max_examples) != n_acc:
            previous.pop("merged_accuracy", None)  # scored on other examples: score the merged model again
        merged_accuracy = previous.get("merged_accuracy") or accuracy(merged, preps, n_acc)
        data["merged_accuracy"] = merged_accuracy
        data["accuracy_examples"] = n_acc  # None = every example of each split
        data["command_tail"] += f" --accuracy-examples {args.accuracy_examples}" if args.accuracy_examples else ""
        print("merged", json.dumps(merged_accuracy), flush=True)
    for item in filter(None, args.variants.split(",")):
        v = Variant.parse(item)
        key = v.key()
        variants[key] = measure(merged, calib, preps, v, args.work, merged_accuracy, n_acc)
        print(key, json.dumps({k: round(c["degradation"], 4) for k, c in variants[key]["checks"].items()}),
              json.dumps(variants[key].get("accuracy", {})), flush=True)
        write_results(args.results, data)  # after every variant: a long run keeps what it measured
    write_results(args.results, data)
    update_readme_section(args.results, readme(data, args.results))
    print(results)


if __name__ == "__main__":
    main()
