"""Scale tuning: after rounding, distil the full-precision model into the quantized model's group scales and norms.

Why: GPTQ rounds each linear to match its own outputs on the calibration blocks, one layer at a time. What a user
sees is the whole model's next-token choice, and on the bundled reverse-words task 4 bits flip a few answers that
sit near the edge, enough to cross the gate's 2-point bar on some draws (docs/release-status.md). Training the
quantized model end to end against the full-precision one closes part of that gap without changing the file's
kind: only each group's **scale** and the **RMSNorm weights** move. The integer codes, zero points, ``g_idx``,
bits, group size and every other tensor stay byte for byte, so the folder loads wherever it loaded before
(``transformers``, GPTQModel, vLLM), and nothing needs lorakit to read it. The method is PEQA's and EfficientQAT's
end-to-end step (train the quantization scales with the codes frozen) with Norm Tweaking's norms, trained here by
distillation rather than on labels. (``tune_scales(..., rounding_lr=R)`` also lets each code move one step;
measured on the bundled release and not adopted: docs/quantize.md, "Learning the rounding too".)

How: each quantized linear becomes ``w = codes · s0 · exp(t)`` per group, with ``t`` trained from 0 (the log form
keeps every scale's sign and keeps it away from zero); the loss is the per-token KL(p_full || p_quantized) over
blocks drawn like the calibration's (by default the tasks' train data alone: no val, test or gate text;
:func:`lorakit.quantize.core.quantize_model` draws them). Every ``HOLDOUT_EVERY``-th block is held out: the KL there is measured before and after, and the tuned scales are kept only
when it went down, so tuning never ships a model further from the full-precision one on calibration text it did not
train on.
Both numbers are recorded (``lorakit_quant.json``, ``tuning``), and, for data with answers, the KL at the held-out
answer positions too (``held_out_answer_kl_*``): what the gate's exact match is decided by moves far less than the
every-position KL (docs/quantize.md). What it buys on the bundled release, and what it
does not: docs/quantize.md ("Scale tuning after rounding").
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import InputError
from lorakit.evaluate.dequant import PackedLinear
from lorakit.quantize.calibration import DEFAULT_N_SAMPLES
from lorakit.quantize.layouts import pack_qweight

HOLDOUT_EVERY = 8  # every 8th tuning block is held out to judge the tuning (16 of the default 128)
WARMUP_STEPS = 5
BATCH_SIZE = 4  # blocks per tuning step
# Memory, per parameter of the model: the float32 teacher, the student (a copy of it while its linears are
# replaced; then their fixed codes in bfloat16 and dequantized weights held for the backward pass), the checkpoint as
# read, and what the allocator keeps: 20.7 bytes measured at 8 steps in float32 on SmolLM2-135M
# (bench/results/tune_memory.json: float32_split.fixed_bytes_per_param; 24 steps peaked no higher), rounded up so the
# estimate covers every measured peak (by 1.18x to 1.53x: runs.*.estimate_over_peak). Per logit of a step
# ([batch, seq, vocab] float32 copies: both models' logits and log-probabilities, the per-token KL, their gradients).
BYTES_PER_PARAM = 24.0
LOGIT_COPIES = 10


class TunedLinear(nn.Module):
    """A quantized linear whose group scales train: ``w = codes · (s0 · exp(t))[group]``, codes fixed, or, with
    ``rounding``, each code free to move one step up or down within its grid (see :func:`tune_scales`)."""

    def __init__(self, packed: PackedLinear, bias: torch.Tensor | None, *, rounding: bool = False):
        super().__init__()
        # q - z fits in bfloat16 exactly (|q - z| < 256), half the memory of float32 for the fixed part
        self.register_buffer("codes", packed.codes.t().to(torch.bfloat16).contiguous(), persistent=False)  # [out, in]
        self.register_buffer("group", packed.group, persistent=False)
        self.register_buffer("s0", packed.scales.to(torch.float32), persistent=False)
        self.log_gain = nn.Parameter(torch.zeros_like(self.s0))
        self.bias = bias
        self.bits = packed.bits
        self.round_offset: nn.Parameter | None = None
        if rounding:
            # the codes' range in q - z terms: q in [0, 2^bits - 1], so q - z in [-z, 2^bits - 1 - z]
            self.register_buffer("zeros", packed.zeros.to(torch.float32), persistent=False)  # [groups, out]
            self.round_offset = nn.Parameter(torch.zeros_like(self.codes, dtype=torch.float32))

    def scales(self) -> torch.Tensor:
        return self.s0 * torch.exp(self.log_gain)

    def code_values(self) -> torch.Tensor:
        """The codes ``q - z`` [out, in] as float32: the stored ones, plus with ``rounding`` each one's learnt step
        (round(offset), offset held to [-1, 1]; its gradient passes straight through the rounding), kept on the grid."""
        codes = self.codes.to(torch.float32)
        if self.round_offset is None:
            return codes
        offset = self.round_offset.clamp(-1.0, 1.0)
        step = offset + (torch.round(offset) - offset).detach()
        low = -self.zeros[self.group].t()
        return torch.clamp(codes + step, low, low + (2**self.bits - 1))

    @torch.no_grad()
    def round_to(self, dtype: torch.dtype) -> int:
        """Hold the scales as the file will store them (e.g. float16) and the codes as whole steps, so what is
        measured next is what ships; returns how many codes the learnt rounding moved (0 without it)."""
        moved = 0
        if self.round_offset is not None:
            codes = self.code_values().to(self.codes.dtype)
            moved = int((codes != self.codes).sum())
            self.codes.copy_(codes)
            self.round_offset.zero_()
        self.s0.copy_(self.scales().to(dtype).to(torch.float32))
        self.log_gain.zero_()
        return moved

    def stored_codes(self) -> torch.Tensor:
        """The codes ``q`` [in, out] as the checkpoint stores them (in ``[0, 2^bits)``), after :meth:`round_to`."""
        return (self.codes.to(torch.float32).t() + self.zeros[self.group]).round().to(torch.int64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.code_values() * self.scales()[self.group].t()
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight.to(x.dtype), bias)


@dataclass
class _Checkpoint:
    shards: dict[str, dict[str, torch.Tensor]]  # file name -> its tensors, as read (written back per shard)

    def __post_init__(self) -> None:
        self.flat = {name: t for tensors in self.shards.values() for name, t in tensors.items()}


def _read_checkpoint(folder: Path) -> _Checkpoint:
    from lorakit.io.safetensors_stream import load_file
    from lorakit.models.folder import shard_names

    return _Checkpoint({shard: dict(load_file(folder / shard)) for shard in shard_names(folder)})


def _student(teacher, quantized: Path, kind: str, checkpoint_format: str, ckpt: _Checkpoint, rounding: bool = False):
    """A copy of the full-precision ``teacher`` with every quantized linear replaced by a :class:`TunedLinear` and
    every other tensor as the quantized checkpoint stores it (AWQ folds its scales into the norms, so they differ)."""
    from lorakit.evaluate.dequant import read_packed_linear

    flat = ckpt.flat
    prefixes = sorted(n[: -len(".qweight")] for n in flat if n.endswith(".qweight"))
    if not prefixes:
        raise InputError(f"{quantized} holds no quantized linears (no qweight tensors); nothing to tune")
    model = copy.deepcopy(teacher)
    for prefix in prefixes:
        parent, attr = prefix.rsplit(".", 1)
        linear = model.get_submodule(prefix)
        packed = read_packed_linear(kind, flat, prefix, linear.in_features, linear.out_features,
                                    checkpoint_format=checkpoint_format)
        bias = flat.get(f"{prefix}.bias")
        setattr(model.get_submodule(parent), attr,
                TunedLinear(packed, None if bias is None else nn.Parameter(bias.float(), requires_grad=False),
                            rounding=rounding))
    state = model.state_dict()
    for name in flat:
        if name in state and not name.startswith(tuple(p + "." for p in prefixes)):
            state[name].copy_(flat[name].to(torch.float32))
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith((".log_gain", ".round_offset")) or _is_norm(name))
    return model, prefixes


def _is_norm(name: str) -> bool:
    return name.endswith(".weight") and "norm" in name.rsplit(".", 2)[-2]


def memory_bytes(model_dir: Path, seq_len: int, batch_size: int = BATCH_SIZE, blocks: int = DEFAULT_N_SAMPLES
                 ) -> dict[str, int]:
    """What :func:`tune_scales` holds at once, in bytes, counted from the full-precision model's weight headers and
    config (nothing loads): the teacher, the student and the checkpoint (``BYTES_PER_PARAM`` per parameter), a
    step's logits (``LOGIT_COPIES`` float32 copies of batch x seq x vocab), the activations both passes keep
    (per layer and token: 10 hidden-wide and 4 intermediate-wide float32 vectors) and the teacher's final hidden
    states of the ``blocks`` tuning reads (one float32 vector per token, :class:`_TeacherTargets`).

    Why it matters: a release tunes by default, after training, merging and rounding; a 7B base on a CPU would need
    over 150 GB here and, without this check (:func:`check_memory`), fail hours into the run."""
    from lorakit.models.folder import read_model_config, tensor_index

    config = read_model_config(model_dir)
    config = config.get("text_config") or config
    params = sum(math.prod(info.shape) for _, info in tensor_index(model_dir).values())
    tokens = int(batch_size) * int(seq_len)
    per_layer = 10 * int(config.get("hidden_size", 0)) + 4 * int(config.get("intermediate_size", 0))
    return {"weights": int(BYTES_PER_PARAM * params),
            "logits": LOGIT_COPIES * 4 * tokens * int(config.get("vocab_size", 0)),
            "activations": 4 * tokens * per_layer * int(config.get("num_hidden_layers", 0)),
            "teacher_states": 4 * int(blocks) * int(seq_len) * int(config.get("hidden_size", 0))}


def check_memory(model_dir: Path, seq_len: int, *, blocks: int = DEFAULT_N_SAMPLES, what: str = "--tune-steps",
                 available: int | None = None) -> None:
    """Refuse scale tuning of ``model_dir`` on ``blocks`` blocks whose :func:`memory_bytes` exceed the memory
    available (``available`` defaults to what the OS reports now), before anything is rounded; ``what`` names the
    setting in the fix."""
    from lorakit.runtime import memory_shortfall, memory_size

    need = memory_bytes(model_dir, seq_len, blocks=blocks)
    short = memory_shortfall(need, available)
    if short is None:
        return
    total, available = short
    raise InputError(
        f"scale tuning needs about {memory_size(total)} at once and {memory_size(available)} of memory is available: "
        f"{memory_size(need['weights'])} for the full-precision and the quantized model, "
        f"{memory_size(need['logits'])} of logits and {memory_size(need['activations'])} of activations per step, "
        f"{memory_size(need['teacher_states'])} of the full-precision model's states on the tuning blocks. "
        f"Turn it off ({what} 0), tune on a CUDA device, or quantize on a machine with more free memory")


def _next_is_answer(mask: torch.Tensor) -> torch.Tensor:
    """The positions whose logits predict an answer token (the token after them is one), from a token mask: the
    positions the answers' own loss is taken at, the decision to end an answer included."""
    out = torch.zeros_like(mask)
    out[:, :-1] = mask[:, 1:]
    return out


def _position_weights(answers: torch.Tensor, answer_weight: float) -> torch.Tensor:
    """Each position's weight in the tuning loss: 1, and ``answer_weight`` where an answer token comes next."""
    return 1.0 + (float(answer_weight) - 1.0) * answers.float()


def _weighted_mean(per_token: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (per_token * weights).sum() / weights.sum().clamp(min=1e-12)


@torch.no_grad()
def _mean_kl(targets: _TeacherTargets, student, batch_size: int,
             answers: torch.Tensor | None = None, answer_weight: float = 1.0
             ) -> tuple[float, float | None, float | None]:
    """(mean KL over every position of ``targets``' blocks, over the ``answers`` positions, and weighted as the
    tuning loss weighs it with ``answer_weight``; the last two None without ``answers``), from one forward pass
    each."""
    total, count, picked, n_picked, weighted, weight_sum = 0.0, 0, 0.0, 0, 0.0, 0.0
    n = targets.blocks.shape[0]
    for i in range(0, n, batch_size):
        per_token = _token_kl(targets, student, torch.arange(i, min(i + batch_size, n)))
        total += float(per_token.sum())
        count += per_token.numel()
        if answers is not None:
            a = answers[i: i + batch_size]
            picked += float(per_token[a].sum())
            n_picked += int(a.sum())
            w = _position_weights(a, answer_weight)
            weighted += float((per_token * w).sum())
            weight_sum += float(w.sum())
    if answers is None:
        return total / max(count, 1), None, None
    return total / max(count, 1), picked / max(n_picked, 1), weighted / max(weight_sum, 1e-12)


def _autocast(x: torch.Tensor, dtype: torch.dtype):
    return torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32)


class _TeacherTargets:
    """The teacher's log-probabilities on a fixed set of blocks, from final hidden states computed once.

    Why: the teacher never changes while the scales train, yet each step ran its whole forward pass on the blocks it
    drew (by default 100 steps of 4 draws from 112 blocks: most blocks several times). Here its transformer body
    runs once per block, in batches of the tuning's own size; a step applies only the output head (one matrix
    product) to the rows it drew: bench/results/tune_teacher_cache.json has the time it saves (``speedup``) and the
    files it writes, identical to the whole teacher's (``identical_files``). Only when there are fewer blocks than
    ``draws`` (the rows the caller will ask for in all): with more, running the body on every block up front would
    cost more than on the rows drawn. Exact, not an approximation: the first batch's ``head(body(x))`` is compared
    with ``teacher(x).logits`` bit for bit, and a model whose logits are not just the head of the last hidden state
    (one that scales or caps them after it) runs the whole teacher every step as before. Memory: blocks x seq x
    hidden float32 values.
    """

    def __init__(self, teacher, blocks: torch.Tensor, batch_size: int, dtype: torch.dtype, draws: int):
        self.teacher, self.blocks, self.dtype = teacher, blocks, dtype
        self.hidden: torch.Tensor | None = None
        head, body = teacher.get_output_embeddings(), getattr(teacher, "base_model", None)
        if head is None or body is None or body is teacher or not 0 < blocks.shape[0] < draws:
            return
        parts = []
        with torch.no_grad(), _autocast(blocks, dtype):
            for i in range(0, blocks.shape[0], batch_size):
                x = blocks[i: i + batch_size]
                hidden = body(input_ids=x).last_hidden_state
                if i == 0 and not torch.equal(head(hidden), teacher(x).logits):
                    return  # the logits are more than the head of the last hidden state: keep the whole teacher
                parts.append(hidden)
        self.hidden = torch.cat(parts)

    @property
    def cached(self) -> bool:
        return self.hidden is not None

    def log_probs(self, rows: torch.Tensor) -> torch.Tensor:
        """log p_teacher [len(rows), seq, vocab] (float32) of the blocks at ``rows``."""
        with torch.no_grad(), _autocast(self.blocks, self.dtype):
            if self.hidden is None:
                logits = self.teacher(self.blocks[rows]).logits
            else:
                logits = self.teacher.get_output_embeddings()(self.hidden[rows])
        return F.log_softmax(logits.float(), dim=-1)


def _token_kl(targets: _TeacherTargets, student, rows: torch.Tensor) -> torch.Tensor:
    """Per-position KL(p_teacher || p_student) [batch, seq] over the blocks at ``rows`` of ``targets``' block set,
    computed in its dtype (autocast)."""
    target = targets.log_probs(rows)
    x = targets.blocks[rows]
    with _autocast(x, targets.dtype):
        logp = F.log_softmax(student(x).logits.float(), dim=-1)
    return F.kl_div(logp, target, log_target=True, reduction="none").sum(-1)


TUNE_TOKENS = ("answers", "all")


def check_tokens(tokens: str, answer_weight: float) -> None:
    """Refuse a ``tokens``/``answer_weight`` pair tuning cannot run (``quantize_model`` calls it before rounding)."""
    if tokens not in TUNE_TOKENS:
        raise InputError(f"--tune-tokens must be one of {', '.join(TUNE_TOKENS)} (got {tokens!r})")
    if not answer_weight >= 1.0:
        raise InputError(f"--tune-answer-weight must be at least 1 (1 = every position alike; got {answer_weight})")
    if tokens == "answers" and answer_weight != 1.0:
        raise InputError("--tune-answer-weight weighs the answer positions among all positions: use it with "
                         "--tune-tokens all (with answers, only the answer positions count already)")


def tune_scales(src: Path, quantized: Path, blocks: torch.Tensor, *, kind: str, checkpoint_format: str = "gptq",
                steps: int, lr: float, batch_size: int = BATCH_SIZE, dtype: torch.dtype = torch.float32, seed: int = 0,
                device: str = "cpu", general_blocks: torch.Tensor | None = None, tokens: str = "all",
                answer_mask: torch.Tensor | None = None, answer_weight: float = 1.0, rounding_lr: float = 0.0,
                progress: bool = True) -> dict:
    """Tune ``quantized``'s group scales and norms in place against ``src`` (its full-precision model) on
    ``blocks`` (see the module docstring); returns the record for ``lorakit_quant.json``. ``general_blocks``
    (general text tuning does not train on) are only watched: their KL before and after is recorded.

    ``tokens``: "all" takes the KL at every position; "answers" only where the next token is an answer token of
    ``answer_mask`` (bool, ``blocks``' shape): the positions where a task's answer, and its end, is decided. Data
    without answers (``answer_mask`` None or empty) is tuned on every position, and the record says so.

    ``answer_weight`` (tokens "all"): an answer position's KL counts this many times in the loss (1 = every position
    alike). Why: tuned on the answers alone, too few positions give the scales a steady gradient (docs/quantize.md);
    weighed up among all positions, the answers steer the tuning while every position still anchors it. The tuning
    is then judged, and kept, on the held-out blocks' KL weighed the same way. On the bundled release's rejected
    float32 model it did not reach the answers at 5e-4 (their held-out KL rose) or 1e-4 (it fell as much as without
    the weighting): docs/quantize.md, "What the answers weigh".

    ``rounding_lr`` > 0 also learns the rounding, at that Adam learning rate: each code may move one step up or down
    (kept within its grid, zero points unchanged), the idea of AutoRound's SignRound (Cheng et al., 2023) taken
    end to end. Each code carries an offset from 0, the forward pass uses ``code + round(offset)`` and the gradient
    passes straight through the rounding, so a code moves only where the distillation pushed it the same way for
    many steps (the cosine schedule's learning rates sum to about ``rounding_lr · steps / 2``, which must pass 0.5).
    Why: the scales are one number per 16 weights; the flips left after scale tuning are answers held by under a nat
    (docs/release-status.md), and which way a weight rounds is the one freedom GPTQ fixed layer by layer. The file
    stays the same layout, bits and zero points; only ``qweight`` changes with the codes. Measured on the bundled
    release, it did not bring answers back: too low a rate moves almost no code, a higher one moves many at once and
    the held-out check drops the tuning (docs/quantize.md, "Learning the rounding too"), so no stage uses it.
    """
    from lorakit.progress import bar

    if steps < 1 or lr <= 0 or rounding_lr < 0:
        raise InputError(f"scale tuning needs steps >= 1, a positive learning rate and a rounding learning rate of at "
                         f"least 0 (got {steps}, {lr}, {rounding_lr})")
    check_tokens(tokens, answer_weight)
    if blocks.shape[0] < 2:
        raise InputError("scale tuning needs at least 2 calibration blocks (one is held out to judge it)")
    if answer_mask is not None and tuple(answer_mask.shape) != tuple(blocks.shape):
        raise ValueError(f"answer mask {tuple(answer_mask.shape)} does not match the blocks {tuple(blocks.shape)}")
    started = time.perf_counter()
    held = torch.arange(blocks.shape[0]) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
    if not held.any():
        held[-1] = True
    # the answer positions are measured whenever the data has answers (the record shows what tuning did there);
    # the loss and the held-out judgement use them per ``tokens`` and ``answer_weight``
    answers = _next_is_answer(answer_mask) if answer_mask is not None else None
    has_answers = answers is not None and bool(answers[~held].any()) and bool(answers[held].any())
    mode = ("answers" if tokens == "answers" else "weighted" if answer_weight != 1.0 else "all") if has_answers else "all"
    note = None
    if (tokens == "answers" or answer_weight != 1.0) and not has_answers:
        note = ("the calibration data has no answers to tune on (text data or a text file, or too few answer "
                "tokens to hold some out): tuned on every token")
    if mode != "weighted":
        answer_weight = 1.0
    train_blocks, held_blocks = blocks[~held].to(device), blocks[held].to(device)
    train_w, held_w = (answers[~held].to(device), answers[held].to(device)) if has_answers else (None, None)
    ckpt = _read_checkpoint(quantized)
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student, prefixes = _student(teacher, quantized, kind, checkpoint_format, ckpt, rounding=rounding_lr > 0)
    student.to(device)  # the TunedLinears' codes and scales were built on the CPU
    params = [p for p in student.parameters() if p.requires_grad]
    offsets = [p for n, p in student.named_parameters() if n.endswith(".round_offset")]
    # the held-out and watched blocks are read twice (before and after), each training block steps x batch / n times
    train_targets = _TeacherTargets(teacher, train_blocks, batch_size, dtype, draws=steps * batch_size)
    held_targets = _TeacherTargets(teacher, held_blocks, batch_size, dtype, draws=2 * held_blocks.shape[0])
    all_before, answers_before, weighted_before = _mean_kl(held_targets, student, batch_size, held_w, answer_weight)
    watched = None if general_blocks is None else general_blocks[::HOLDOUT_EVERY].to(device)
    watched_targets = (None if watched is None else
                       _TeacherTargets(teacher, watched, batch_size, dtype, draws=2 * watched.shape[0]))
    general_before = None if watched is None else _mean_kl(watched_targets, student, batch_size)[0]
    scales_and_norms = [p for n, p in student.named_parameters() if p.requires_grad and not n.endswith(".round_offset")]
    optimizer = torch.optim.Adam([{"params": scales_and_norms, "lr": lr}]
                                 + ([{"params": offsets, "lr": rounding_lr}] if offsets else []))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / WARMUP_STEPS) * 0.5 * (1 + math.cos(math.pi * i / steps)))
    generator = torch.Generator().manual_seed(seed)
    losses = []
    with bar(total=steps, desc="tuning scales", unit="step", disable=not progress) as pbar:
        for _ in range(steps):
            pick = torch.randint(0, train_blocks.shape[0], (batch_size,), generator=generator).to(device)
            per_token = _token_kl(train_targets, student, pick)
            if mode == "all":
                loss = per_token.mean()
            elif mode == "answers":  # a batch whose blocks hold no answer token has nothing to learn from
                w = train_w[pick]
                loss = per_token[w].sum() / w.sum().clamp(min=1)
            else:
                loss = _weighted_mean(per_token, _position_weights(train_w[pick], answer_weight))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            pbar.update(1)
            pbar.set_postfix(kl=f"{sum(losses[-10:]) / len(losses[-10:]):.4f}")  # noisy per batch: a running mean
    student.eval()
    moved = _round_to_stored(student, prefixes, ckpt)
    all_after, answers_after, weighted_after = _mean_kl(held_targets, student, batch_size, held_w, answer_weight)
    general_after = None if watched is None else _mean_kl(watched_targets, student, batch_size)[0]
    # judged on what it trained for, on blocks it did not train on
    before, after = {"all": (all_before, all_after), "answers": (answers_before, answers_after),
                     "weighted": (weighted_before, weighted_after)}[mode]
    kept = after < before
    if kept:
        _write_back(quantized, ckpt, student, prefixes, kind)
    return {
        "steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed, "compute_dtype": str(dtype).split(".")[-1],
        "device": str(device), "tokens": "answers" if mode == "answers" else "all",
        **({"answer_weight": answer_weight} if mode == "weighted" else {}),
        **({"tokens_note": note} if note else {}),
        "trained": ["group scales", "norm weights"] + (["rounding"] if offsets else []),
        **({"rounding_lr": rounding_lr, "codes_moved": moved,
            "codes_moved_fraction": _figure(moved / sum(p.numel() for p in offsets))} if offsets else {}),
        "trainable_params": sum(p.numel() for p in params),
        "train_blocks": int(train_blocks.shape[0]), "held_out_blocks": int(held_blocks.shape[0]),
        "held_out_kl_before": _figure(all_before), "held_out_kl_after": _figure(all_after),
        **({} if held_w is None else {"held_out_answer_positions": int(held_w.sum()),
                                      "held_out_answer_kl_before": _figure(answers_before),
                                      "held_out_answer_kl_after": _figure(answers_after)}),
        **({} if mode != "weighted" else {"held_out_weighted_kl_before": _figure(weighted_before),
                                          "held_out_weighted_kl_after": _figure(weighted_after)}),
        **({} if watched is None else {"general_blocks_watched": int(watched.shape[0]),
                                       "general_kl_before": _figure(general_before),
                                       "general_kl_after": _figure(general_after)}),
        "loss_by_tenth": _loss_by_tenth(losses),
        "teacher": "hidden states cached" if train_targets.cached else "whole forward pass each step",
        "kept": kept, "seconds": round(time.perf_counter() - started, 3),
    }


def _loss_by_tenth(losses: list[float]) -> list[float]:
    """The training loss's mean over each tenth of the steps (fewer parts for fewer steps): whether it fell steadily
    or rose while the learning rate was high (the per-step loss is too noisy to keep whole)."""
    parts = min(10, len(losses))
    bounds = [round(i * len(losses) / parts) for i in range(parts + 1)]
    return [_figure(sum(losses[a:b]) / (b - a)) for a, b in zip(bounds, bounds[1:])]


def _figure(kl: float) -> float:
    """A KL for the record: four significant digits (a tiny model's KL is ~1e-5, so not a fixed number of places)."""
    return float(f"{kl:.4g}")


@torch.no_grad()
def _round_to_stored(student, prefixes: list[str], ckpt: _Checkpoint) -> int:
    """Round every tuned value to its tensor's dtype in the checkpoint (and learnt codes to whole steps): the
    held-out KL is then the file's. Returns how many codes moved."""
    moved = sum(student.get_submodule(prefix).round_to(ckpt.flat[f"{prefix}.scales"].dtype) for prefix in prefixes)
    for name, param in student.named_parameters():
        if _is_norm(name):
            param.copy_(param.to(ckpt.flat[name].dtype).to(torch.float32))
    return moved


def _write_back(folder: Path, ckpt: _Checkpoint, student, prefixes: list[str], kind: str) -> None:
    """Rewrite each shard with the tuned scales and norms in their stored dtypes, and the codes where the rounding
    was learnt; every other tensor as read."""
    from safetensors.torch import save_file

    tuned: dict[str, torch.Tensor] = {}
    for prefix in prefixes:
        linear = student.get_submodule(prefix)
        tuned[f"{prefix}.scales"] = linear.scales().detach().cpu()
        if linear.round_offset is not None:
            tuned[f"{prefix}.qweight"] = pack_qweight(kind, linear.stored_codes().cpu(), linear.bits)
    for name, param in student.named_parameters():
        if _is_norm(name):
            tuned[name] = param.detach().cpu()
    for shard, tensors in ckpt.shards.items():
        out = {n: (tuned[n].to(t.dtype).contiguous() if n in tuned else t) for n, t in tensors.items()}
        tmp = folder / f".{shard}.tuning"
        save_file(out, str(tmp), metadata={"format": "pt"})
        tmp.replace(folder / shard)


__all__ = ["HOLDOUT_EVERY", "TUNE_TOKENS", "TunedLinear", "check_memory", "memory_bytes", "tune_scales"]
