"""Check a whole release run before any stage runs: every problem at once, in seconds, writing nothing.

Without it a bad run config fails late: a merge weight after both adapters trained, a group size inside the
quantize task, a registry name (valid alone, too long once the flow appends ``-adapter-<task>``) after the whole
run. :func:`preflight` reads the config key by key and checks what the stages will need, collecting one line per
problem (the key at fault and the fix) instead of stopping at the first:

- the schema (pydantic) errors, each on its own line, and the sections that did validate are still checked;
- datasets: every file exists, is readable and parses, and its format is detectable (or has the columns the
  configured format needs), with the same readers ``lorakit prep`` uses; the calibration set that joins every
  dataset's files must have one format too;
- merge weights: one per dataset, finite (the schema's wording);
- the base: a supported, unquantized model folder, and ``quantize.group_size`` against every quantized layer
  (:mod:`lorakit.quantize.checks`, the rules the quantize stage applies);
- merge method regmean: its float64 Gram matrices of every adapted layer's inputs (and the base) fit the memory
  available, counted from the base's weight headers (a wide base would otherwise train for hours, then fail);
- quantization on this machine's CPU: rounding (the model in its compute dtype, the calibration blocks' layer states,
  a layer's Hessians) and scale tuning (``quantize.tune_steps``, on in a release: the full-precision and the quantized
  model with a step's logits) fit the memory available, counted the same way;
- every registry name and tag the run will create (:func:`registry.validate_name`);
- the general text the gate scores and calibration mixes in (``gate.general_text``, ``quantize.calib_general``);
- calibration volume, only when ``quantize.n_samples`` or ``seq_len`` is set explicitly (an explicit request that
  cannot be filled is an error; the default size is the quantize stage's to fit to the data): counted with the
  base's tokenizer on the prepared calibration split when it exists, else on every raw example rendered as prep
  renders it (a superset of the train split, so a shortfall is certain, never a guess);
- the devices of training and quantization (skipped with ``route_gpu``: those run on the CUDA pool's machine).

Cheap: no weights load and nothing runs on a device. The base's weight headers are read (lorakit's safetensors
reader imports torch), CUDA is queried only when a CUDA device is requested on a machine that has an NVIDIA
driver, the quantize stage's compute dtype is resolved as the stage will resolve it (with ``compute_dtype: auto``
on a CPU with bfloat16 flags, the bfloat16 probe: a few small matmuls, once per machine and then cached,
:func:`lorakit.compute.cpu_bf16_probe`), and the tokenizer loads only for an explicit calibration request. Prefect-free: ``lorakit run`` calls it
before it starts a Prefect server. :func:`plan_lines` prints what ``lorakit run --check`` shows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from flows.config import ReleaseConfig, describe_error, weights_count_problem
from flows.plan import ReleasePlan, sources
from lorakit.errors import InputError


@dataclass
class Preflight:
    """What the checks found. ``config`` is None only when the schema refused it (then ``problems`` says why)."""

    config: ReleaseConfig | None
    base_dir: Path | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, line: str) -> None:
        if line not in self.problems:  # the schema and a check may say the same thing; say it once
            self.problems.append(line)

    def error(self, source: str) -> InputError:
        if len(self.problems) == 1:  # one problem stays one line, worded as the schema's own errors are
            return InputError(f"{source}: {self.problems[0]}. "
                              "Fix the file (keys and defaults: docs/pipeline.md, 'The run config').")
        lines = "\n".join(f"  - {p}" for p in self.problems)
        return InputError(f"{source}: {len(self.problems)} problem(s), nothing was run or written:\n{lines}\n"
                          "Fix the config (keys and defaults: docs/pipeline.md, 'The run config'), then re-run.")


def _as_keys(message: str, section: str) -> str:
    """Library messages name CLI flags (``--group-size``); a run config has keys (``quantize.group_size``)."""
    return re.sub(r"--([a-z][a-z-]*)", lambda m: f"{section}.{m.group(1).replace('-', '_')}", message)


def _validate(data: dict[str, Any], report: Preflight) -> tuple[ReleaseConfig, set[str]]:
    """The config, or on schema errors their lines plus a config of the sections that did validate.

    Returns the config and the top-level keys that failed (their checks are skipped: they would only repeat the
    schema's complaint about a default that is not what the file says).
    """
    try:
        return ReleaseConfig.model_validate(data), set()
    except ValidationError as exc:
        for e in exc.errors():
            report.add(describe_error(e))
    good, bad = {}, set()
    for name, info in ReleaseConfig.model_fields.items():
        if name not in data:
            continue
        try:
            good[name] = TypeAdapter(info.annotation).validate_python(data[name])
        except ValidationError:
            bad.add(name)
    weights = data.get("merge", {}).get("weights") if isinstance(data.get("merge"), dict) else None
    if isinstance(weights, list) and isinstance(data.get("datasets"), list) and len(weights) != len(data["datasets"]):
        report.add(weights_count_problem(len(weights), len(data["datasets"])))
        bad.add("merge")
    return ReleaseConfig.model_construct(**good), bad


def _check_datasets(cfg: ReleaseConfig, report: Preflight) -> dict[str, list] | None:
    """Load every data file as prep will; returns the loaded sources by dataset (None if any failed)."""
    from lorakit.data.prep import _choose_format  # prep's own rule: detect, or check the configured format
    from lorakit.data.sources import load_source

    loaded: dict[str, list] = {}
    ok = True
    for i, ds in enumerate(cfg.datasets):
        key = f"datasets.{i}"
        try:
            paths = sources(ds)
        except InputError as exc:
            report.add(f"'{key}.bundled': {exc}")
            ok = False
            continue
        got = []
        for j, path in enumerate(paths):
            where = f"'{key}.files.{j}'" if ds.files else f"'{key}.bundled'"
            try:
                got.append(load_source(path))
            except InputError as exc:
                report.add(f"{where}: {exc}")
            except OSError as exc:  # permission denied, I/O error
                report.add(f"{where}: cannot read {path} ({exc.strerror or exc}); fix its permissions or the path")
        if len(got) != len(paths):
            ok = False
            continue
        try:
            fmt, _ = _choose_format(got, ds.format)
        except InputError as exc:
            report.add(f"'{key}' ({ds.name}): {_as_keys(str(exc), key)}")
            ok = False
            continue
        search = cfg.merge_search()
        if fmt == "text" and search is not None and search.objective == "accuracy":
            report.add(f"'merge.search.objective': accuracy scores greedy answers, but '{key}' ({ds.name}) is text "
                       "data with no reference answers; use objective nll, or instruction/chat data")
            ok = False
        loaded[ds.name] = got
    if ok and cfg.calib_dataset() is None and len(cfg.datasets) > 1:
        try:  # the calibration set prepares every dataset's files together, with the first one's format setting
            _choose_format([s for ds in cfg.datasets for s in loaded[ds.name]], cfg.datasets[0].format)
        except InputError as exc:
            report.add(f"'quantize.calib_dataset': calibration joins every dataset's files, but {exc}; "
                       "set quantize.calib_dataset to one dataset")
            ok = False
    return loaded if ok else None


def _resolve_base(cfg: ReleaseConfig, report: Preflight) -> Path | None:
    """The base model folder without side effects where possible: the embedded default is not converted here."""
    from lorakit.models.embedded import DEFAULT_MODEL_NAME, default_model_dir
    from lorakit.models.folder import resolve_model_dir

    if cfg.base in ("", "default", DEFAULT_MODEL_NAME):
        path = default_model_dir()
        if not (path / "config.json").exists():
            report.notes.append("the embedded default base is not converted yet (the first stage does it, ~1 min); "
                                "its group-size and calibration checks happen in the stages")
            return None
        return path
    try:
        return resolve_model_dir(cfg.base).absolute()
    except InputError as exc:
        report.add(f"'base': {exc}")
        return None


def _check_quantize(cfg: ReleaseConfig, base_dir: Path, report: Preflight) -> None:
    """The base must be quantizable, and the configured group size must fit every quantized layer.

    The merged model the quantize stage reads has the base's architecture, so the base's config decides. A group
    size that does not divide a layer is replaced by a smaller one in the stage (with a note); when the config
    sets it explicitly, the run would not make what the config asks for, so that is an error here.
    """
    from lorakit.quantize.checks import check_method, check_model, resolve_group_size

    q = cfg.quantize
    try:
        model_config = check_model(base_dir)
    except InputError as exc:
        report.add(f"'base': {exc}")
        return
    if q.target_degradation is not None:
        return  # the search picks methods and group sizes itself, skipping those that do not fit
    try:
        check_method(q.method, q.bits, q.group_size)
        _, note = resolve_group_size(model_config, q.group_size, strict="group_size" in q.model_fields_set)
    except InputError as exc:
        report.add(f"'quantize.group_size': {_as_keys(str(exc), 'quantize')}")
        return
    if note:
        report.notes.append(f"quantize.group_size (default): {note}")


def _check_layers(cfg: ReleaseConfig, base_dir: Path, report: Preflight) -> None:
    """``lora.layers`` must name decoder layers the base has: refused now, not when the first adapter loads."""
    from lorakit.models.folder import read_model_config
    from lorakit.train.options import adapted_layers

    try:
        adapted_layers(cfg.lora.layers, read_model_config(base_dir), str(cfg.base))
    except InputError as exc:
        report.add(f"'lora.layers': {str(exc).removeprefix('--layers: ')}")


def _check_merge_memory(cfg: ReleaseConfig, base_dir: Path, report: Preflight) -> None:
    """Method regmean holds float64 Gram matrices of every adapted layer's inputs; a base too wide for this
    machine's memory is refused now, not after its adapters trained (the merge stage checks the same,
    :func:`lorakit.merge.regmean.check_memory`, with the adapters' own modules)."""
    from lorakit.merge.regmean import check_memory
    from lorakit.models.folder import linear_weight_shapes
    from lorakit.train.model import parse_targets

    if not cfg.merges_with_regmean() or len(cfg.datasets) < 2:
        return  # one adapter is its own fit: nothing is read or held
    try:
        shapes = linear_weight_shapes(base_dir, parse_targets(cfg.lora_for(cfg.datasets[0]).target))
        if shapes:  # a target that matches nothing is the training stage's to refuse, with its fix
            check_memory(base_dir, shapes, len(cfg.datasets), cfg.merge.regmean_anchor)
    except InputError as exc:
        report.add(f"'merge.method': {exc}")


def _check_quantize_memory(cfg: ReleaseConfig, base_dir: Path, report: Preflight) -> None:
    """The quantize stage runs after hours of training and merging: a base whose rounding (the model in its compute
    dtype, the calibration states, a layer's Hessians: :func:`lorakit.quantize.checks.check_rounding_memory`) or
    whose scale tuning (on by default in a release: the full-precision and the quantized model at once,
    :func:`lorakit.quantize.tune.check_memory`) does not fit this machine's memory is refused now; the quantize stage
    checks the same before it rounds. Only where quantization runs on this machine's CPU: with route_gpu, or a CUDA
    device here, the device's memory holds it."""
    from lorakit.compute import resolve_compute_dtype
    from lorakit.quantize.calibration import DEFAULT_N_SAMPLES
    from lorakit.quantize.checks import check_rounding_memory
    from lorakit.quantize.tune import check_memory

    q = cfg.quantize
    on_cpu = q.device == "cpu" or (q.device == "auto" and not _cuda_driver_present())
    if cfg.route_gpu or not on_cpu:
        return
    try:
        dtype = str(resolve_compute_dtype(cfg.compute_dtype, "quantize", "cpu")).removeprefix("torch.")
        check_rounding_memory(base_dir, q.method, dtype, n_samples=q.n_samples or DEFAULT_N_SAMPLES,
                              seq_len=q.seq_len, what="the quantize stage")
    except InputError as exc:
        report.add(f"'quantize': {exc}")
    if not q.tune_steps:
        return
    try:
        check_memory(base_dir, q.seq_len, blocks=q.tune_samples or q.n_samples or DEFAULT_N_SAMPLES,
                     what="quantize.tune_steps")
    except InputError as exc:
        report.add(f"'quantize.tune_steps': {exc}")


def _check_names(cfg: ReleaseConfig, base_dir: Path | None, report: Preflight) -> None:
    """Every registry name and tag the run will register, as the registry will judge them: one line for the base's
    name, one for all names derived from ``registry.name`` (with the longest ``registry.name`` that fits)."""
    from flows.names import artifact_names, release_tag
    from registry.refs import MAX_NAME, MAX_TAG, validate_name, validate_tag

    from lorakit.models.embedded import DEFAULT_MODEL_NAME

    n = cfg.registry.name
    refused: list[tuple[str, str]] = []
    for role, name in artifact_names(cfg, str(base_dir) if base_dir is not None else DEFAULT_MODEL_NAME).items():
        try:
            validate_name(name, "that name")
        except InputError as exc:
            if role == "base":
                report.add(f"'base': {exc}; rename the base model folder")
            else:
                refused.append((name, str(exc)))
    tag = release_tag(cfg)
    try:
        validate_tag(tag)
    except InputError as exc:
        refused.append((tag, str(exc)))
    if not refused:
        return
    longest, why = max(refused, key=lambda r: len(r[0]))
    fits = min(MAX_NAME - (len(longest) - len(n)), MAX_TAG - (len(tag) - len(n)))
    fix = (f"use a registry.name of at most {fits} characters (or shorter dataset names)"
           if any(len(name) > MAX_NAME for name, _ in refused) else "change registry.name")
    report.add(f"'registry.name': the run would register {len(refused)} name(s) the registry refuses (longest: "
               f"'{longest}'; {why}); {fix}")


def _check_general_text(cfg: ReleaseConfig, report: Preflight) -> None:
    """General text the gate scores and calibration mixes in: a missing file fails now, not after training."""
    from lorakit.gate.general import resolve_general_text

    for key, value in (("gate.general_text", cfg.gate.general_text),
                       ("quantize.calib_general", cfg.quantize.calib_general)):
        try:
            resolve_general_text(value)
        except InputError as exc:
            report.add(f"'{key}': {exc}")


def _check_folders(cfg: ReleaseConfig, report: Preflight) -> None:
    for key, value in (("output_dir", cfg.output_dir), ("registry.root", cfg.registry.root)):
        if value and Path(value).exists() and not Path(value).is_dir():
            report.add(f"'{key}': {value} is a file; point {key} at a folder (it is created if missing)")


def _calibration_texts(cfg: ReleaseConfig, loaded: dict[str, list], tokenizer) -> tuple[list[str], str]:
    """The texts calibration will read: the prepared train split if it exists, else every raw example rendered
    as prep renders it (train is a subset of it, so the count is an upper bound)."""
    from lorakit.data.formats import detect_format, has_chat_template, render_record
    from lorakit.data.splits import PREP_META, read_texts

    plan = ReleasePlan(cfg)
    name = cfg.calib_dataset()
    prep = plan.prep(next(d for d in cfg.datasets if d.name == name)) if name else plan.calibration()
    if (Path(prep["output"]) / PREP_META).exists():
        return read_texts(prep["output"], "train"), f"the prepared calibration set {prep['output']} (train split)"
    chosen = [ds for ds in cfg.datasets if name in (None, ds.name)]
    fmt_setting = chosen[0].format
    srcs = [s for ds in chosen for s in loaded[ds.name]]
    fmt = fmt_setting if fmt_setting != "auto" else detect_format(srcs[0])
    if fmt == "chat" and not has_chat_template(tokenizer):
        raise InputError("chat data needs a chat template, but the base's tokenizer has none; use a base whose "
                         "tokenizer has one, or convert the data to instruction/text format")
    texts = [render_record(r, fmt, tokenizer).text for s in srcs for r in s.records]
    what = f"dataset {name}" if name else "every dataset together"
    return texts, f"{what} (all raw examples, not yet prepared; the train split is smaller)"


def _check_calibration(cfg: ReleaseConfig, base_dir: Path, loaded: dict[str, list], report: Preflight) -> None:
    """Can an explicit ``n_samples`` x ``seq_len`` be filled? Tokens are counted as calibration joins them (each
    text's tokens without special tokens, then EOS), stopping once the request is met."""
    q = cfg.quantize
    if q.n_samples is None:  # not asked for: the stage takes what the data gives (lorakit.quantize.calibration)
        return
    from lorakit.data.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(str(base_dir)).tokenizer
    except InputError as exc:
        report.add(f"'base': {exc}")
        return
    try:
        texts, what = _calibration_texts(cfg, loaded, tokenizer)
    except InputError as exc:  # an example prep could not render either
        report.add(f"'datasets': {exc}")
        return
    need, have = q.n_samples * q.seq_len, 0
    extra = 1 if tokenizer.eos_token_id is not None else 0
    for text in texts:
        have += len(tokenizer(text, add_special_tokens=False)["input_ids"]) + extra
        if have >= need:
            return
    blocks = have // q.seq_len
    fix = (f"lower quantize.n_samples (this fills at most {blocks} blocks of {q.seq_len})" if blocks
           else f"lower quantize.seq_len below {have}")
    report.add(f"'quantize.n_samples': {q.n_samples} x seq_len {q.seq_len} needs {need} calibration tokens but "
               f"{what} gives at most {have}; {fix}, add data, or remove both keys to leave the size to "
               "the quantize stage")


def _cuda_driver_present() -> bool:
    """Whether an NVIDIA driver answers, without importing torch (seconds): no driver, no CUDA device."""
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


def _check_devices(cfg: ReleaseConfig, report: Preflight) -> None:
    if cfg.route_gpu:
        return  # training and quantization run on the CUDA pool's worker, not on this machine
    for key, device in (("lora.device", cfg.lora.device), ("quantize.device", cfg.quantize.device)):
        if device in ("auto", "cpu"):
            continue
        if device.startswith("cuda") and not _cuda_driver_present():
            report.add(f"'{key}': {device} was requested but this machine has no CUDA device (no NVIDIA driver "
                       f"answers); set {key}: auto or cpu, or route_gpu: true to train on the CUDA pool")
            continue
        from lorakit.runtime import resolve_device

        try:
            resolve_device(device)
        except InputError as exc:
            report.add(f"'{key}': {_as_keys(str(exc), key.split('.')[0])}")


def _check_environment(report: Preflight) -> None:
    """Machine settings read later in the run (the gate's kernel path), so a typo fails now, not after training."""
    from lorakit.runtime import kernel_backend

    try:
        kernel_backend("gptq")
    except InputError as exc:
        report.add(str(exc))


def preflight(data: Any) -> Preflight:
    """Every check on a parsed (not yet validated) run config; see the module docstring for the list."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return Preflight(None, problems=[f"the top level must be a mapping of keys (base:, datasets:, ...), got "
                                f"{type(data).__name__}"])
    report = Preflight(None)
    _check_environment(report)
    cfg, bad = _validate(data, report)
    report.config = None if report.problems else cfg
    _check_folders(cfg, report)
    if not {"gate", "quantize"} & bad:
        _check_general_text(cfg, report)
    loaded = _check_datasets(cfg, report) if "datasets" not in bad else None
    base_dir = report.base_dir = _resolve_base(cfg, report) if "base" not in bad else None
    if base_dir is not None and "quantize" not in bad:
        _check_quantize(cfg, base_dir, report)
    if base_dir is not None and "lora" not in bad:
        _check_layers(cfg, base_dir, report)
    if base_dir is not None and not {"merge", "lora", "datasets"} & bad:
        _check_merge_memory(cfg, base_dir, report)
    if base_dir is not None and not {"quantize", "route_gpu"} & bad:
        _check_quantize_memory(cfg, base_dir, report)
    if not {"registry", "datasets"} & bad:
        _check_names(cfg, base_dir, report)
    if not {"lora", "quantize", "route_gpu"} & bad:
        _check_devices(cfg, report)
    if loaded is not None and base_dir is not None and not report.problems:
        _check_calibration(cfg, base_dir, loaded, report)  # the one costly check: only on an otherwise good config
    return report


def check_release(data: Any, source: str = "config") -> Preflight:
    """:func:`preflight`, raising one :class:`InputError` (exit 2) that lists every problem."""
    report = preflight(data)
    if report.problems:
        raise report.error(source)
    return report


def _state(path: str) -> str:
    return "exists" if Path(path).is_dir() else "to run"


def plan_lines(cfg: ReleaseConfig, base_dir: Path | None = None) -> list[str]:
    """Each stage with its output folder and whether that folder already exists (``lorakit run --check``)."""
    from flows.names import artifact_names
    from lorakit.models.embedded import DEFAULT_MODEL_NAME
    from registry import default_root

    plan = ReleasePlan(cfg)
    rows: list[tuple[str, str]] = []
    preps, adapters = {}, []
    for ds in cfg.datasets:
        preps[ds.name] = plan.prep(ds)["output"]
        rows.append((f"prep {ds.name}", preps[ds.name]))
        adapters.append(plan.train(ds, preps[ds.name])["output"])
        rows.append((f"train {ds.name}", adapters[-1]))
    merged = plan.merge(adapters, preps)["output"]
    rows.append(("merge", merged))
    name = cfg.calib_dataset()
    calib = preps[name] if name else plan.calibration()["output"]
    if not name:
        rows.append(("prep calibration", calib))
    quantized = plan.quantize(merged, calib)["output"]
    rows.append(("quantize", quantized))
    card = plan.scorecard(dict(zip([ds.name for ds in cfg.datasets], adapters)), merged, quantized, preps)["output"]
    rows.append(("scorecard", card))
    rows.append(("gate", plan.gate(merged, quantized, preps, card)["output"]))
    if cfg.export.gguf:  # the release flow's GGUF export of the merged model, gated like the quantized one
        gguf = plan.export_gguf(merged)["output"]
        rows += [(f"export gguf {cfg.export.gguf}", gguf), ("gate gguf", plan.gate(merged, gguf, preps)["output"])]
    width = max(len(label) for label, _ in rows)
    lines = [f"{label:<{width}}  {_state(path):<6}  {path}" for label, path in rows]
    done = sum(Path(path).is_dir() for _, path in rows)
    root = Path(cfg.registry.root).absolute() if cfg.registry.root else default_root()
    names = sorted(set(artifact_names(cfg, str(base_dir or DEFAULT_MODEL_NAME)).values()))
    lines += [f"{done} of {len(rows)} stage outputs exist; a stage whose folder exists is taken from Prefect's cache "
              "when its code, arguments and input files are unchanged (else it runs again)",
              f"registers in {root}: {', '.join(names)}"]
    return lines
