"""Scale tuning with the teacher's hidden states cached, against the whole teacher every step: time, and same files.

``lorakit.quantize.tune._TeacherTargets`` runs the full-precision model's transformer body once per tuning block and
applies only its output head at each step, where tuning ran the whole model on every block it drew (100 steps of 4
draws from 112 blocks by default). The cache is meant to change time only: this bench tunes the same copy of a
release's 4-bit folder both ways, each in a fresh process, the two side by side with one thread each (same machine,
same other load: a fair ratio), in the release's own settings (its calibration blocks,
lr, steps, compute dtype) and records each tuning's seconds, its record (held-out KL before and after) and the
SHA-256 of the files it wrote, which must be identical.

Usage: python bench/tune_teacher_cache.py --release OUT [--steps 100] [--results NAME]
Writes bench/results/NAME.json (default tune_teacher_cache) and its section of bench/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from bench.common import cpu_line, find_one, release_parser, update_readme_section, write_results  # noqa: E402

ORDER = ("cached", "whole")


def child(release: Path, mode: str, steps: int) -> None:
    """One tuning of a fresh copy of the release's 4-bit folder in this process; prints a JSON line."""
    import shutil
    import tempfile

    import torch

    from lorakit.compute import resolve_compute_dtype
    from lorakit.quantize import read_quant_meta
    from lorakit.quantize import tune
    from lorakit.quantize.calibration import build_calibration
    from lorakit.quantize.core import _load_tokenizer, _tuning_blocks
    from lorakit.runtime import configure_threads

    if mode == "whole":  # the teacher as tuning ran it before the cache: its whole forward pass on every draw
        class Whole(tune._TeacherTargets):
            def __init__(self, teacher, blocks, batch_size, dtype, draws):
                self.teacher, self.blocks, self.dtype, self.hidden = teacher, blocks, dtype, None

        tune._TeacherTargets = Whole
    configure_threads()
    merged = find_one(release, "merged/model-*", dirs=True)
    quantized = find_one(release, "quantized/gptq-*", dirs=True)
    calib = find_one(release, "prep/calibration-*", dirs=True)
    meta = read_quant_meta(quantized)
    p, cal = meta.params, meta.calibration
    share = (cal.get("general") or {}).get("fraction", 0.0)
    tokenizer = _load_tokenizer(merged)
    calibration = build_calibration(calib, tokenizer, n_samples=p.n_samples, seq_len=p.seq_len, seed=p.seed,
                                    general="default" if share else None, general_fraction=share)
    blocks, answer_mask, watched = _tuning_blocks(calibration, calib, tokenizer, p.tune_general_fraction or 0.0,
                                                  "default", n_samples=p.n_samples, seq_len=p.seq_len, seed=p.seed)
    dtype = resolve_compute_dtype(p.compute_dtype or "auto", "quantize", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "q"
        # the folder as found (a release keeps its tuned scales, which are then the starting point): the same for
        # both modes, so what is compared is the tuning procedure
        shutil.copytree(quantized, folder)
        load_before = os.getloadavg()[0]
        record = tune.tune_scales(merged, folder, blocks, kind="gptq", steps=steps, lr=p.tune_lr or 5e-4,
                                  general_blocks=watched, answer_mask=answer_mask, dtype=dtype, seed=p.seed,
                                  progress=False)
        digests = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.glob("*.safetensors"))}
    print(json.dumps({"mode": mode, "record": record, "digests": digests, "dtype": str(dtype).split(".")[-1],
                      "threads": torch.get_num_threads(), "loadavg_1m_before": round(load_before, 2),
                      "loadavg_1m_after": round(os.getloadavg()[0], 2)}))


def readme(data: dict, name: str) -> str:
    runs = data["runs"]
    lines = [f"## {name}", "",
             f"`python bench/tune_teacher_cache.py --release {data['release']} --steps {data['steps']}`: scale tuning "
             f"({data['steps']} steps, batch 4, {runs['cached']['dtype']}) of the release's 4-bit model, once with the "
             "teacher's final hidden states cached (each block's transformer body once, the output head per step) and "
             "once running the whole teacher on every block drawn, each in a fresh process, the two side by side "
             "with one thread each. "
             f"CPU: {cpu_line(data['machine'].get('cpu'))}.", "",
             "| teacher | seconds | held-out KL before → after | load (1 min) before / after |", "|---|---|---|---|"]
    for mode in ORDER:
        r = runs[mode]
        rec = r["record"]
        lines.append(f"| {'cached hidden states' if mode == 'cached' else 'whole forward pass each step'} | "
                     f"{rec['seconds']:.0f} | {rec['held_out_kl_before']} → {rec['held_out_kl_after']} | "
                     f"{r['loadavg_1m_before']} / {r['loadavg_1m_after']} |")
    first, last = sorted(ORDER, key=lambda m: runs[m]["record"]["seconds"])
    alone = runs[last]["record"]["seconds"] - runs[first]["record"]["seconds"]
    lines += ["", f"Speed-up: {data['speedup']:.2f}x; files written identical: {data['identical_files']}; "
              f"records identical (but time): {data['identical_records']}. The {first} run finished first, so the "
              f"{last} one ran its last {alone:.0f} s with one process fewer beside it: the ratio favours the "
              f"{last} run."]
    return "\n".join(lines)


def main() -> None:
    ap = release_parser(__doc__)
    ap.add_argument("--steps", type=int, default=100, help="tuning steps of each run (the release's: 100)")
    ap.add_argument("--results", default="tune_teacher_cache", help="results name (bench/results/NAME.json)")
    ap.add_argument("--child", choices=ORDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.release, args.child, args.steps)
    # side by side, one thread each: both see the same machine and the same other load, so their ratio is fair
    # even on a machine that is not idle (the load average is recorded with each)
    print(f"tuning twice side by side ({args.steps} steps each, one thread each)...", file=sys.stderr, flush=True)
    env = {**os.environ, "LORAKIT_THREADS": "1"}
    procs = {mode: subprocess.Popen([sys.executable, __file__, "--release", str(args.release), "--steps",
                                     str(args.steps), "--child", mode], stdout=subprocess.PIPE, text=True, env=env)
             for mode in ORDER}
    runs = {}
    for mode, proc in procs.items():
        out, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"the {mode} tuning failed (exit {proc.returncode})")
        runs[mode] = json.loads(out.strip().splitlines()[-1])
        print(f"  {mode}: {runs[mode]['record']['seconds']:.0f} s", file=sys.stderr, flush=True)
    strip = lambda rec: {k: v for k, v in rec.items() if k not in ("seconds", "teacher")}  # noqa: E731
    data = {"release": str(args.release), "steps": args.steps, "runs": runs,
            "speedup": round(runs["whole"]["record"]["seconds"] / runs["cached"]["record"]["seconds"], 3),
            "identical_files": runs["whole"]["digests"] == runs["cached"]["digests"],
            "identical_records": strip(runs["whole"]["record"]) == strip(runs["cached"]["record"])}
    data = json.loads(write_results(args.results, data).read_text())
    update_readme_section(args.results, readme(data, args.results))
    print(readme(data, args.results))


if __name__ == "__main__":
    main()
