"""``train_adapter``: QLoRA (or plain LoRA) training of one adapter on a prepared-data folder.

The loop is deliberately small and explicit instead of a Trainer: the data order and learning rate are pure
functions of the step, so a resumed run is the same computation as an uninterrupted one; the loss is summed over
every labelled token of the whole (accumulated) batch and divided once, so ``grad_accum`` does not reweight
examples; and the sanity gate sees every step.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import lorakit
from lorakit.adapters import TRAIN_META
from lorakit.compute import dtype_name, resolve_compute_dtype
from lorakit.data.formats import IGNORE_INDEX
from lorakit.data.prep import read_prep
from lorakit.data.splits import PREP_META
from lorakit.data.tokenizer import base_id, tokenizer_digest
from lorakit.errors import InputError
from lorakit.io.atomic import atomic_dir, check_output_free, read_json, write_json
from lorakit.io.digests import file_manifest, manifest_digest
from lorakit.progress import bar as progress_bar
from lorakit.models.folder import read_model_config, resolve_model_dir, ties_embeddings, weights_digest
from lorakit.train.batches import Rows, Schedule, load_rows, model_inputs
from lorakit.train.checkpoint import checkpoint_root, latest_checkpoint, load_checkpoint, save_checkpoint
from lorakit.train.model import (assert_not_repacked, check_tied_targets, dropout_off, load_for_training,
                                 parse_targets, pick_device)
from lorakit.train.prefix import MIN_PREFIX, prefix_batch, prefix_hidden
from lorakit.train.sanity import TrainingSanityError, check_loss_fell, check_step
from lorakit.train import variants
from lorakit.train.options import (DEFAULT_MAX_STEPS, TRAIN, adapted_layers, parse_layer_spec,
                                   without_default_layers)

TRAIN_LOG = "train_log.jsonl"


@dataclass
class TrainConfig:
    """Every setting that defines the run (the ``config`` block of lorakit_train.json)."""

    quant: str = TRAIN.quant
    r: int = TRAIN.r
    alpha: float = TRAIN.alpha
    dropout: float = TRAIN.dropout
    target: str = TRAIN.target
    layers: str = TRAIN.layers  # all | top:N | A-B (lorakit.train.options.parse_layer_spec)
    rslora: bool = TRAIN.rslora
    lr: float = TRAIN.lr
    epochs: float | None = TRAIN.epochs
    max_steps: int | None = TRAIN.max_steps
    batch_size: int = TRAIN.batch_size
    grad_accum: int = TRAIN.grad_accum
    seed: int = TRAIN.seed
    warmup_ratio: float = TRAIN.warmup_ratio
    schedule: str = "linear"  # linear warm-up, then linear decay towards 0
    weight_decay: float = TRAIN.weight_decay
    max_grad_norm: float = TRAIN.max_grad_norm
    min_loss_drop: float | None = TRAIN.min_loss_drop
    checkpoint_every: int | None = TRAIN.checkpoint_every
    device: str = TRAIN.device
    gradient_checkpointing: bool | None = TRAIN.gradient_checkpointing  # None: on for CUDA, off on CPU
    compute_dtype: str = "auto"  # lorakit.compute: auto = bfloat16 only where it is fast on this machine
    variant: str = TRAIN.variant  # lora | dora (lorakit.train.variants)
    init: str = TRAIN.init  # default | loftq | pissa | olora
    lora_plus_ratio: float | None = TRAIN.lora_plus_ratio  # LoRA+: B's lr = ratio x A's; None = one lr

    def validate(self) -> None:
        positive = {"r": self.r, "batch_size": self.batch_size, "grad_accum": self.grad_accum}
        for name, value in positive.items():
            if int(value) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        if self.epochs is not None and self.max_steps is not None:
            raise InputError("pass either --epochs or --max-steps, not both")
        if self.max_steps is not None and int(self.max_steps) < 1:
            raise InputError(f"--max-steps must be at least 1, got {self.max_steps}")
        if self.epochs is not None and not float(self.epochs) > 0:
            raise InputError(f"--epochs must be positive, got {self.epochs}")
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise InputError(f"--lr must be a finite number >= 0, got {self.lr}")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not self.alpha > 0:
            raise InputError(f"--alpha must be positive, got {self.alpha}")
        if self.checkpoint_every is not None and int(self.checkpoint_every) < 1:
            raise InputError(f"--checkpoint-every must be at least 1, got {self.checkpoint_every}")
        variants.check_variant(self.variant, self.init, self.quant, self.lora_plus_ratio)
        try:
            parse_layer_spec(self.layers)
        except ValueError as exc:
            raise InputError(f"--layers: {exc}") from None

    def fingerprint(self, prep_digest: str, base_digest: str, compute_dtype: str) -> str:
        """What a checkpoint must match to be resumed: everything that changes the computation, including the
        dtype ``auto`` resolved to (a checkpoint moved to a machine that resolves differently is not resumed)."""
        # layers 'all' left out, as before the option existed, so older checkpoints still resume
        fields = without_default_layers({k: v for k, v in asdict(self).items()
                                         if k not in ("checkpoint_every", "min_loss_drop")})
        blob = json.dumps({"config": fields, "prep": prep_digest, "base": base_digest, "compute_dtype": compute_dtype},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class TrainRecord:
    """Everything ``lorakit_train.json`` holds; serialises 1:1 and reads back with :func:`read_train_record`."""

    base: str
    base_dir: str
    base_digest: str  # lorakit.models.folder.weights_digest(base_dir); merging checks it
    tied_embeddings: bool
    prep: dict[str, Any]
    config: dict[str, Any]
    target_modules: list[str]
    trainable_params: int
    device: str
    compute_dtype: str
    gradient_checkpointing: bool
    steps: int
    epochs_done: float
    tokens: int
    first_loss: float
    final_loss: float
    best_loss: float
    first_batch_loss_before: float
    first_batch_loss_after: float
    loss_drop: float
    resumed_from_step: int | None
    wall_time_s: float
    versions: dict[str, str]
    torch_threads: int | None = None  # CPU float sums depend on it; None in records written before it was kept
    # the process's peak resident memory when the adapter was written: the training's own when it ran in a process
    # of its own (lorakit.train.child), else also whatever the process did before; None where not measurable
    peak_rss_mib: float | None = None
    # lorakit.train.prefix: whether the micro-batches' shared prompt ran once ("used"), and why not, with the
    # first micro-batch's loss both ways; token positions the decoder ran (< tokens when it did). None: older record
    shared_prefix: dict[str, Any] | None = None
    computed_tokens: int | None = None
    lorakit_version: str = lorakit.__version__
    stage: str = "train"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def read_train_record(adapter_dir: str | os.PathLike[str]) -> TrainRecord:
    raw = read_json(Path(adapter_dir) / TRAIN_META, "training metadata")
    try:
        return TrainRecord(**raw)
    except TypeError as exc:
        raise InputError(f"{Path(adapter_dir) / TRAIN_META} does not match this lorakit version ({exc})") from None


@dataclass
class TrainResult:
    output: Path
    metadata: dict[str, Any]
    final_loss: float
    steps: int
    log: list[dict] = field(default_factory=list)


def _peak_rss_mib() -> float | None:
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return None
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux (bytes on macOS)
    return round(kib / (1024 * 1024 if platform.system() == "Darwin" else 1024), 1)


def lr_at(step: int, total: int, lr: float, warmup_ratio: float) -> float:
    warmup = max(1, math.ceil(warmup_ratio * total)) if warmup_ratio > 0 else 0
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * max(0.0, (total - step) / max(1, total - warmup))


def _versions() -> dict[str, str]:
    import peft
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "peft": peft.__version__}
    try:
        import bitsandbytes

        out["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:  # pragma: no cover - only --quant none works without it
        out["bitsandbytes"] = "not installed"
    return out


# Labelled positions per output-head chunk: 1024 x 49152 (SmolLM2's vocabulary) float32 logits are 200 MB.
LOSS_CHUNK = 1024


def _causal_lm_parts(model):
    """(decoder, output head) of a (PEFT-wrapped) causal LM whose logits are exactly ``head(decoder(x))``;
    None for models that post-process logits (soft-capping, scaling), which keep the plain path."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    if any(getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling")):
        return None
    try:
        decoder, head = inner.get_decoder(), inner.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or head is None or decoder is inner:
        return None
    return decoder, head


def _head_loss_sum(head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(head(hidden).float(), labels, reduction="sum")


def _head_loss_sum_chunked(head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the labelled positions of ``hidden`` (aligned with ``labels``), by chunks."""
    from torch.utils.checkpoint import checkpoint

    keep = labels != IGNORE_INDEX
    hidden, targets = hidden[keep], labels[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.shape[0], LOSS_CHUNK):
        h, t = hidden[start:start + LOSS_CHUNK], targets[start:start + LOSS_CHUNK]
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(_head_loss_sum, head, h, t, use_reentrant=False)
        else:
            total = total + _head_loss_sum(head, h, t)
    return total


def _batch_loss_sum(model, rows: Rows, idx: torch.Tensor, device: str, shared_prefix: bool = False,
                    stats: dict[str, int] | None = None) -> torch.Tensor:
    """Sum of token cross-entropies of one microbatch (labels shifted as in causal LM training).

    The output head runs only on the hidden states of labelled positions, in chunks of :data:`LOSS_CHUNK` whose
    logits are recomputed in the backward pass (activation checkpointing of the head alone), so
    full-vocabulary logits never exist for every position at once: for 8 packed rows of 256 tokens of
    SmolLM2-135M they were 8 x 256 x 49152 float32 values (403 MB) per copy, with their log-softmax and gradient
    beside them. The sum is the same as cross-entropy over full logits with ``ignore_index`` (a test compares
    both to a float64 reference). With ``shared_prefix`` the documents' common prompt runs once
    (:mod:`lorakit.train.prefix`, the same sum); ``stats["computed_tokens"]`` adds the positions the decoder ran.
    """
    parts = _causal_lm_parts(model)
    batch = None
    if shared_prefix and parts is not None:
        batch = prefix_batch(rows.input_ids[idx], rows.labels[idx], rows.position_ids[idx], pad_id=0)
    if stats is not None:
        stats["computed_tokens"] = stats.get("computed_tokens", 0) + (
            batch.computed_tokens if batch is not None else int(rows.input_ids[idx].numel()))
    if batch is not None:
        decoder, head = parts
        hidden = prefix_hidden(decoder, batch, device)[:, :-1]
        return _head_loss_sum_chunked(head, hidden, batch.suffix_labels[:, 1:].to(device))
    inputs = model_inputs(rows, idx, device)
    labels = rows.labels[idx][:, 1:].to(device)
    if parts is None:
        logits = model(**inputs, use_cache=False).logits[:, :-1].float()
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=IGNORE_INDEX, reduction="sum")
    decoder, head = parts
    hidden = decoder(**inputs, use_cache=False).last_hidden_state[:, :-1]
    return _head_loss_sum_chunked(head, hidden, labels)


# How far the shared-prefix loss may sit from the packed one on the run's first micro-batch (relative). Both sum
# the same terms in another order: float32 (eps 1.2e-7) agrees far inside 1e-4 (bench/results/shared_prefix.json,
# training.*.max_loss_rel_diff); bfloat16 carries 8 bits (eps 7.8e-3). A document dropped or counted twice moves the
# sum by about 1/documents (~5% for the ~20 of a release micro-batch), past either bound.
PREFIX_CHECK_RTOL = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 2e-2}


def _shared_prefix_plan(model, rows: Rows, dropout: float, gradient_checkpointing: bool) -> str | None:
    """Why the shared-prefix path cannot be exact for this run (None: it can)."""
    if rows.attention_mask is not None:
        return "rows are padded, not packed"
    if dropout > 0:
        return f"LoRA dropout {dropout} draws its own mask for every copy of the prompt"
    if gradient_checkpointing:
        return "gradient checkpointing runs without the KV cache"
    if _causal_lm_parts(model) is None:
        return "the model post-processes its logits"
    return None


def _check_shared_prefix(model, rows: Rows, idx: torch.Tensor, device: str, compute_dtype: str) -> dict[str, Any]:
    """Both paths' loss on one micro-batch; ``used`` is whether they agree (the run then takes the shared path)."""
    if prefix_batch(rows.input_ids[idx], rows.labels[idx], rows.position_ids[idx], pad_id=0) is None:
        return {"used": False, "reason": f"the documents share fewer than {MIN_PREFIX} leading prompt tokens"}
    with torch.no_grad():
        packed = float(_batch_loss_sum(model, rows, idx, device))
        try:
            shared = float(_batch_loss_sum(model, rows, idx, device, shared_prefix=True))
        except (TypeError, AttributeError, ValueError, RuntimeError) as exc:  # a decoder without a usable KV cache
            return {"used": False, "reason": f"the decoder cannot run from a shared KV cache ({exc})"}
    rel = abs(shared - packed) / max(abs(packed), 1e-12)
    tol = PREFIX_CHECK_RTOL.get(compute_dtype, 2e-2)
    out = {"used": rel <= tol, "check_loss_packed": packed, "check_loss_shared": shared, "check_rel_diff": rel,
           "check_rtol": tol}
    if rel > tol:
        out["reason"] = f"its loss differed from the packed rows' by {rel:.2e} (> {tol:g}) on the first micro-batch"
    return out


def _label_count(rows: Rows, micro: list[torch.Tensor]) -> int:
    return int(sum((rows.labels[idx][:, 1:] != IGNORE_INDEX).sum() for idx in micro))


def _check_prep(prep_dir: Path):
    record = read_prep(prep_dir)
    files = {k: v for k, v in file_manifest(prep_dir).items() if k != PREP_META}
    if manifest_digest(files, "prep-data") != record.data_digest:
        raise InputError(f"the data files in {prep_dir} do not match its {PREP_META} (modified or corrupt); "
                         "re-run `lorakit prep`")
    return record


def _resolve_base(base, prep) -> tuple[Path, str]:
    if base is None:
        recorded = Path(prep.tokenizer.get("model_dir") or "")
        if prep.tokenizer["id"] != lorakit.models.embedded.MODEL_ID and recorded.is_dir():
            return recorded, prep.tokenizer["id"]
        base_dir = resolve_model_dir(None)
        return base_dir, base_id(None, base_dir)
    base_dir = resolve_model_dir(base)
    return base_dir, base_id(base, base_dir)


def train_adapter(
    prep_dir: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] | None = None,
    quant: str = TRAIN.quant,
    r: int = TRAIN.r,
    alpha: float = TRAIN.alpha,
    dropout: float = TRAIN.dropout,
    target: str = TRAIN.target,
    layers: str = TRAIN.layers,
    rslora: bool = TRAIN.rslora,
    lr: float = TRAIN.lr,
    epochs: float | None = TRAIN.epochs,
    max_steps: int | None = TRAIN.max_steps,
    batch_size: int = TRAIN.batch_size,
    grad_accum: int = TRAIN.grad_accum,
    seed: int = TRAIN.seed,
    resume: bool = False,
    device: str = TRAIN.device,
    checkpoint_every: int | None = TRAIN.checkpoint_every,
    warmup_ratio: float = TRAIN.warmup_ratio,
    weight_decay: float = TRAIN.weight_decay,
    max_grad_norm: float = TRAIN.max_grad_norm,
    min_loss_drop: float | None = TRAIN.min_loss_drop,
    gradient_checkpointing: bool | None = TRAIN.gradient_checkpointing,
    compute_dtype: str = "auto",
    variant: str = TRAIN.variant,
    init: str = TRAIN.init,
    lora_plus_ratio: float | None = TRAIN.lora_plus_ratio,
    keep_checkpoints: bool = False,
    on_step: Callable[[dict], None] | None = None,
    force: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train one LoRA adapter on ``prep_dir``'s train split and write a PEFT adapter folder at ``output``.

    ``base`` defaults to the model whose tokenizer prep used (the embedded default when prep used it). Defaults:
    :class:`lorakit.train.options.TrainOptions` (as ``lorakit train`` and the run config's ``lora:``); without
    ``epochs``/``max_steps`` the run is :data:`~lorakit.train.options.DEFAULT_MAX_STEPS` optimizer steps. ``on_step`` receives each step's log entry (progress reporting
    for callers such as Prefect tasks; an exception there interrupts the run like Ctrl-C, leaving checkpoints).
    Raises :class:`InputError` on bad input and :class:`TrainingSanityError` when the run fails the sanity gate;
    in both cases nothing is written at ``output``.
    """
    import lorakit.models.embedded  # noqa: F401  (used by _resolve_base)

    started = time.perf_counter()
    output = Path(output)
    prep_dir = Path(prep_dir)
    if epochs is None and max_steps is None:  # recorded as the step count it means
        max_steps = DEFAULT_MAX_STEPS
    cfg = TrainConfig(quant=quant, r=int(r), alpha=float(alpha), dropout=float(dropout),
                      target=target if isinstance(target, str) else ",".join(target), layers=str(layers),
                      rslora=bool(rslora),
                      lr=float(lr), epochs=epochs, max_steps=max_steps, batch_size=int(batch_size),
                      grad_accum=int(grad_accum), seed=int(seed), warmup_ratio=float(warmup_ratio),
                      weight_decay=float(weight_decay), max_grad_norm=float(max_grad_norm),
                      min_loss_drop=min_loss_drop, checkpoint_every=checkpoint_every, device=device,
                      gradient_checkpointing=gradient_checkpointing, compute_dtype=compute_dtype, variant=variant,
                      init=init, lora_plus_ratio=None if lora_plus_ratio is None else float(lora_plus_ratio))
    cfg.validate()
    check_output_free(output, force)
    prep = _check_prep(prep_dir)
    base_dir, base_name = _resolve_base(base, prep)
    if tokenizer_digest(base_dir) != prep.tokenizer["digest"]:
        raise InputError(
            f"{prep_dir} was tokenized with {prep.tokenizer['id']}'s tokenizer, but base {base_name} has a different "
            f"one; re-run `lorakit prep --base {base_name}` or train with --base {prep.tokenizer['id']}"
        )
    model_config = read_model_config(base_dir)
    tied = ties_embeddings(model_config)
    layer_list = adapted_layers(cfg.layers, model_config, base_name)
    targets = parse_targets(cfg.target)
    check_tied_targets(targets, tied, base_name)
    variants.check_base(base_dir, cfg.variant, cfg.quant, targets)
    rows = load_rows(prep_dir, "train")
    schedule = Schedule(len(rows), cfg.batch_size, cfg.grad_accum, cfg.seed)
    total = int(cfg.max_steps) if cfg.max_steps is not None else schedule.steps_for_epochs(cfg.epochs)
    dev = pick_device(cfg.device)
    dtype = dtype_name(resolve_compute_dtype(cfg.compute_dtype, "train", dev))
    base_digest = weights_digest(base_dir)
    fingerprint = cfg.fingerprint(prep.data_digest, base_digest, dtype)
    root = checkpoint_root(output)
    ckpt = latest_checkpoint(root) if root.exists() else None
    if ckpt is not None and not resume and not force:
        raise InputError(f"checkpoints of an earlier run exist in {root}; pass --resume to continue it, or --force "
                         "to start over")
    if not resume and root.exists():
        shutil.rmtree(root)
        ckpt = None

    loaded = load_for_training(base_dir, quant=cfg.quant, device=dev, r=cfg.r, alpha=cfg.alpha,
                               dropout=cfg.dropout, targets=targets, rslora=cfg.rslora, seed=cfg.seed,
                               gradient_checkpointing=cfg.gradient_checkpointing, compute_dtype=dtype,
                               variant=cfg.variant, init=cfg.init, layers=layer_list)
    model = loaded.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    initial = variants.initial_state(model, cfg.init)
    optimizer = variants.build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.lora_plus_ratio)
    torch.manual_seed(cfg.seed)  # dropout stream

    start_step, log, first_batch_loss, elapsed_before, resumed_from = 0, [], None, 0.0, None
    if ckpt is not None:
        state, log = load_checkpoint(ckpt, model, optimizer, fingerprint)
        start_step, first_batch_loss = int(state["step"]), state["first_batch_loss"]
        elapsed_before, resumed_from = float(state["elapsed_s"]), start_step

    why_not = _shared_prefix_plan(model, rows, cfg.dropout, loaded.gradient_checkpointing)
    shared_prefix = ({"used": False, "reason": why_not} if why_not else
                     _check_shared_prefix(model, rows, schedule.step_microbatches(start_step)[0], dev,
                                          loaded.compute_dtype))
    use_prefix = bool(shared_prefix["used"])
    bar = progress_bar(total=total, initial=start_step, desc="training", unit="step", disable=not progress)
    run_started = time.perf_counter()
    try:
        for step in range(start_step, total):
            t0 = time.perf_counter()
            step_lr = lr_at(step, total, cfg.lr, cfg.warmup_ratio)
            for group in optimizer.param_groups:
                group["lr"] = step_lr * group.get(variants.LR_SCALE, 1.0)
            micro = schedule.step_microbatches(step)
            n_labels = max(1, _label_count(rows, micro))
            loss_sum, stats = 0.0, {}
            for idx in micro:
                part = _batch_loss_sum(model, rows, idx, dev, shared_prefix=use_prefix, stats=stats)
                (part / n_labels).backward()
                loss_sum += float(part.detach())
            loss = loss_sum / n_labels
            if step == start_step:
                assert_not_repacked(model)
            if step == 0:
                first_batch_loss = loss
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
            check_step(step + 1, loss, grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            tokens = int(sum(int(rows.tokens[idx].sum()) for idx in micro))
            entry = {"step": step + 1, "epoch": round(schedule.epoch_at(step), 4), "loss": loss, "grad_norm": grad_norm,
                     "lr": step_lr, "tokens": tokens, "computed_tokens": stats["computed_tokens"],
                     "tokens_per_s": tokens / dt if dt > 0 else None,
                     "step_time_s": dt, "elapsed_s": elapsed_before + time.perf_counter() - run_started}
            log.append(entry)
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.update(1)
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total:
                save_checkpoint(root, step + 1, model, optimizer,
                                {"fingerprint": fingerprint, "first_batch_loss": first_batch_loss,
                                 "elapsed_s": entry["elapsed_s"]}, log)
            if on_step is not None:
                on_step(entry)
        bar.close()

        # The gate's final check: the same first batch, same code path (training mode, dropout off), after training.
        dropout_off(model)
        with torch.no_grad():
            micro = schedule.step_microbatches(0)
            after = sum(float(_batch_loss_sum(model, rows, idx, dev, shared_prefix=use_prefix))
                        for idx in micro) / max(1, _label_count(rows, micro))
        drop = check_loss_fell(first_batch_loss, after, cfg.min_loss_drop)
    except TrainingSanityError:
        bar.close()
        shutil.rmtree(root, ignore_errors=True)  # resuming would replay the same failure
        raise
    except BaseException:
        bar.close()
        raise

    losses = [e["loss"] for e in log]
    record = TrainRecord(
        base=base_name, base_dir=str(base_dir), base_digest=base_digest, tied_embeddings=tied,
        prep={"path": str(prep_dir.resolve()), "digest": prep.data_digest, "format": prep.format,
              "pack": prep.pack, "row_length": prep.row_length, "train_rows": len(rows),
              "tokenizer_id": prep.tokenizer["id"], "tokenizer_digest": prep.tokenizer["digest"]},
        config=asdict(cfg), target_modules=loaded.target_modules, trainable_params=loaded.trainable_params,
        device=dev, compute_dtype=loaded.compute_dtype, gradient_checkpointing=loaded.gradient_checkpointing,
        steps=total, epochs_done=round(schedule.epoch_at(total - 1), 4), tokens=sum(e["tokens"] for e in log),
        first_loss=losses[0], final_loss=losses[-1], best_loss=min(losses),
        first_batch_loss_before=first_batch_loss, first_batch_loss_after=after, loss_drop=drop,
        resumed_from_step=resumed_from, wall_time_s=round(elapsed_before + time.perf_counter() - started, 3),
        versions=_versions(), torch_threads=torch.get_num_threads(), peak_rss_mib=_peak_rss_mib(),
        shared_prefix=shared_prefix, computed_tokens=sum(e["computed_tokens"] for e in log if "computed_tokens" in e),
    )
    model.peft_config["default"].base_model_name_or_path = base_name
    with atomic_dir(output, force=force) as tmp:
        variants.save_adapter(model, tmp, cfg.init, initial)
        (tmp / TRAIN_LOG).write_text("".join(json.dumps(e) + "\n" for e in log))
        write_json(tmp / TRAIN_META, record.to_json())
    if not keep_checkpoints:
        shutil.rmtree(root, ignore_errors=True)
    return TrainResult(output, record.to_json(), losses[-1], total, log)
