"""RegMean: merge LoRA adapters so each keeps its own layer outputs on its own task's inputs.

Why: a weighted sum Σ wᵢ·ΔWᵢ adds every adapter's update to every input. Two adapters trained on disjoint tasks
from the same base also learn a shared part (the answer format, the chat template's prompt); summed, that part
counts twice and each task's inputs also meet the other task's update. On the default release's 80-step adapters
no linear weights kept more than 64% of both tasks' val exact match (bench/results/merge_regmean.json).

RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023) solves, per
linear layer, the least-squares problem of matching every model's outputs on its own data:

    W* = argmin_W Σₜ ‖Xₜ Wᵀ − Xₜ Wₜᵀ‖²   ⇒   W* = (Σₜ Wₜ G̃ₜ)(Σₜ G̃ₜ)⁻¹,   Gₜ = XₜᵀXₜ,

with Xₜ the layer's inputs when model t (base + adapter t) reads task t's training examples, and G̃ₜ = α·Gₜ +
(1 − α)·diag(Gₜ) (the paper's shrinkage of the off-diagonal, which keeps Σ G̃ₜ well conditioned). Since every
Wₜ = W + ΔWₜ shares the base W, W* = W + Σₜ ΔWₜ G̃ₜ S⁻¹ (S = Σₜ G̃ₜ), and with ΔWₜ = sₜ·BₜAₜ that is
Σₜ sₜ·Bₜ (Aₜ G̃ₜ S⁻¹): each adapter's A re-projected, then the exact linear sum (:func:`project`). The result is
therefore again a rank-Σrᵢ LoRA adapter, or a model folder, through the normal merge writer; weights wᵢ still
scale each projected update (1.0 each is RegMean itself).

The general-text anchor (``regmean_anchor`` λ > 0) adds one more term: the base itself, whose update is zero,
on general English (lorakit's shipped corpus, last documents first, never the ones the release gate scores):
S = Σₜ G̃ₜ + λ·c·G̃₀ with G₀ = X₀ᵀX₀ of the base's layer inputs on that text and c = (mean task tokens) / (its
tokens), so λ = 1 weighs it like one task. Where general text reads a layer, the merged update is pulled toward
zero, i.e. toward the base's outputs; where only a task reads it, the task's update stays. Why: every adapter
forgets some general English, and RegMean's sum of updates forgets it for both tasks at once.

It is a least-squares fit, not an identity: how far each task's layer outputs move from its adapter's is reported
per task (``residual``: ‖Xₜ(ΔW* − ΔWₜ)ᵀ‖ / ‖XₜΔWₜᵀ‖ over the Gram matrices, mean and max over the modules).
Only the adapted modules change; a module one adapter does not adapt is refused by the compatibility check.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lorakit.adapters import Adapter
from lorakit.errors import InputError
from lorakit.merge.linear import weighted_sum
from lorakit.merge.method import MergeMethod, Param
from lorakit.progress import bar as progress_bar, emit

DEFAULT_ALPHA = 0.9  # the paper's off-diagonal scale for language models
DEFAULT_EXAMPLES = 128  # training examples per task whose inputs define Gₜ
DEFAULT_ANCHOR = 0.0  # weight of the general-text anchor (0 = RegMean itself)
ANCHOR_TOKENS = 8192  # general-text tokens the anchor reads (the gate's general window is as long)
BATCH = 16
GRAM_ITEM_BYTES = 8  # the Gram matrices are float64: sums over thousands of tokens, then a solve


def gram_count(tasks: int, anchor: float | None) -> int:
    """Gram matrices held per adapted module: one per task, and the anchor's when it is on."""
    return int(tasks) + (1 if float(anchor or 0.0) > 0 else 0)


def memory_bytes(shapes: dict[str, tuple[int, int]], grams: int, base_params: int,
                 shared: dict[str, str] | None = None) -> dict[str, int]:
    """What :func:`collect_grams` holds at once, in bytes, besides one batch's activations: ``grams`` float64 Gram
    matrices per adapted module, each its input width squared (``shapes``: each module's weight, out x in), except
    that modules reading the same input (``shared``: module -> the module whose Gram it uses, :func:`input_sharing`)
    hold one between them; the base in float32; and the pristine float32 copy of its adapted weights
    (:class:`lorakit.merge.in_memory.InMemoryMerge`).

    Why it matters: the Grams grow with the square of a layer's input width. Every linear layer of a Llama adapted
    (q/k/v share one, gate/up one), per task: 30 x (3 x 576² + 1536²) x 8 bytes = 0.8 GB on SmolLM2-135M,
    32 x (3 x 4096² + 11008²) x 8 bytes = 44 GB on a 7B Llama; without this check such a release would train its
    adapters for hours, then be killed for memory here."""
    shared = shared or {}
    own = [i for name, (_, i) in shapes.items() if name not in shared]
    return {"grams": int(grams) * GRAM_ITEM_BYTES * sum(int(i) ** 2 for i in own),
            "weights": 4 * (int(base_params) + sum(int(o) * int(i) for o, i in shapes.values()))}


def input_sharing(base_dir: Path, names: Sequence[str]) -> dict[str, str]:
    """Module -> the earlier module whose input tensor it reads, among ``names`` (q/k/v read one, gate/up one, in a
    Llama): found by running the base's architecture once on the meta device, where nothing is allocated, with the
    same hooks :func:`collect_grams` shares by. {} when that pass cannot run (an architecture that needs remote code
    or does not trace on meta): every module then counts its own Gram, an upper bound."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(base_dir))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        owner: dict[str, str] = {}
        hooks = _gram_hooks(model, names, {}, owner=owner, collect=False)
        try:
            _decoder(model, names)(input_ids=torch.zeros((1, 8), dtype=torch.long, device="meta"))
        finally:
            for h in hooks:
                h.remove()
    except Exception:  # noqa: BLE001 - the estimate falls back to its upper bound; the merge itself still runs
        return {}
    return {n: o for n, o in owner.items() if n != o}


def check_memory(base_dir: Path, shapes: dict[str, tuple[int, int]], tasks: int, anchor: float | None,
                 available: int | None = None) -> None:
    """Refuse a RegMean of ``tasks`` adapters of the modules ``shapes`` (name -> out x in) on ``base_dir`` whose
    :func:`memory_bytes` exceed the memory available (``available`` defaults to what the OS reports now), before
    any weights load (the base is counted from its weight headers, shared inputs from :func:`input_sharing`); the
    error says what each part takes and what to do instead."""
    from lorakit.models.folder import tensor_index
    from lorakit.runtime import memory_shortfall, memory_size

    base_params = sum(math.prod(info.shape) for _, info in tensor_index(base_dir).values())
    need = memory_bytes(shapes, gram_count(tasks, anchor), base_params, input_sharing(base_dir, list(shapes)))
    short = memory_shortfall(need, available)
    if short is None:
        return
    total, available = short
    anchored = gram_count(tasks, anchor) > tasks
    per = f"{tasks} task(s)" + (" and the general-text anchor" if anchored else "")
    widest = max(i for _, i in shapes.values())
    raise InputError(
        f"method regmean needs about {memory_size(total)} at once and {memory_size(available)} of memory is available: "
        f"{memory_size(need['grams'])} of float64 Gram matrices (one per adapted module's input for each of {per}, the "
        f"largest {widest} x {widest}) and {memory_size(need['weights'])} of float32 weights. Merge with "
        "method linear or ties (no Gram matrices), adapt fewer or narrower modules (lora target), "
        + ("turn the anchor off (regmean_anchor 0), " if anchored else "")
        + "or merge on a machine with more free memory")


def check_data(adapters: Sequence[Adapter], data: Sequence[str | os.PathLike[str]] | None, alpha: float,
               examples: int, anchor: float = DEFAULT_ANCHOR) -> list[Path]:
    """One prepared-data folder per adapter (its task's train split is read), before any weights load."""
    from lorakit.data.splits import has_split

    if not data:
        raise InputError("method regmean needs the task data of every adapter: pass --data PREP once per adapter, in "
                         "the adapters' order (the `lorakit prep` folders they trained on)")
    if len(data) != len(adapters):
        raise InputError(f"method regmean got {len(data)} data folder(s) for {len(adapters)} adapter(s); pass one "
                         "--data PREP per adapter, in order")
    if not 0.0 <= float(alpha) <= 1.0:
        raise InputError(f"regmean alpha must be in [0, 1], got {alpha}")
    if int(examples) < 1:
        raise InputError(f"regmean examples must be at least 1, got {examples}")
    if not (math.isfinite(float(anchor)) and float(anchor) >= 0.0):
        raise InputError(f"regmean anchor must be a finite weight >= 0 (0 = off), got {anchor}")
    bad = [a.label for a in adapters if a.dora or a.loftq]
    if bad:
        raise InputError(f"adapter {bad[0]} is a DoRA or LoftQ adapter; regmean re-projects plain LoRA factors only "
                         "(use method linear)")
    out = []
    for d in data:
        path = Path(d).expanduser()
        if not (path / "prep.json").is_file() or not has_split(path, "train"):
            raise InputError(f"{d} is not a prepared-data folder with a train split; pass the `lorakit prep` output "
                             "each adapter trained on")
        out.append(path)
    return out


def _documents(prep: Path, examples: int) -> list[str]:
    from lorakit.data.splits import read_texts

    texts = read_texts(prep, "train")[: int(examples)]
    if not texts:
        raise InputError(f"the train split of {prep} is empty; regmean needs its task's examples")
    return texts


def _gram_hooks(model, names: Sequence[str], gram: dict[str, torch.Tensor], mask: list[torch.Tensor] | None = None,
                owner: dict[str, str] | None = None, collect: bool = True):
    """Forward pre-hooks adding each named module's input Gram XᵀX (float64) to ``gram[name]``; ``mask[0]``, when
    given, selects the real (unpadded) tokens of the current batch.

    Modules reading the same input tensor as the module hooked just before them (q/k/v, gate/up) share that
    module's Gram matrix, the same tensor object: one product and one matrix between them (``owner``: module -> the
    module whose matrix it holds, decided on the first batch, checked on every later one). ``collect=False`` only
    records ``owner`` (:func:`input_sharing`, on the meta device)."""
    owner = {} if owner is None else owner
    last: list[Any] = [None, None]  # (input tensor, the module whose Gram it went into)

    def hook_for(name: str):
        def hook(module, args):
            same = args[0] is last[0]
            if name not in owner:
                owner[name] = owner[last[1]] if same else name
            elif (owner[name] != name) != (same and owner[last[1]] == owner[name]):
                raise RuntimeError(f"regmean: module {name} read another input than on the first batch; its shared "
                                   "Gram matrix would be wrong")
            last[:] = [args[0], name]
            if not collect or owner[name] != name:
                return
            x = args[0].reshape(-1, args[0].shape[-1])
            x = (x[mask[0]] if mask is not None else x).float()
            product = (x.T @ x).double()
            if name in gram:
                gram[name].add_(product)
            else:
                gram[name] = product
        return hook

    return [model.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]


def _share(gram: dict[str, torch.Tensor], owner: dict[str, str], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Every module's Gram: its own, or (the same tensor) the one of the module whose input it shares."""
    missing = [n for n in names if owner.get(n) not in gram]
    if missing:
        raise RuntimeError(f"regmean: the forward pass never reached module {missing[0]}; its Gram matrix is empty")
    return {name: gram[owner[name]] for name in names}


def _decoder(model, names: Sequence[str]):
    """The decoder stack that reads every adapted module (the whole model when the output head is adapted)."""
    if hasattr(model, "get_decoder") and not any(n.startswith("lm_head") for n in names):
        return model.get_decoder()
    return model


@torch.no_grad()
def collect_grams(base_dir: Path, adapters: Sequence[Adapter], data: Sequence[Path], *,
                  examples: int = DEFAULT_EXAMPLES, anchor_tokens: int = 0, progress: bool = True
                  ) -> tuple[list[dict[str, torch.Tensor]], list[int], tuple[dict[str, torch.Tensor], dict] | None]:
    """Gₜ = XₜᵀXₜ (float64) of every adapted module's input, model t reading task t's first ``examples`` training
    documents (tokenized as training rendered them, padded batches, padding left out); the tokens read; and with
    ``anchor_tokens`` the anchor's G₀: the base itself (the same in-memory model, restored) reading that many tokens
    of lorakit's general corpus in windows of 512, as the gate reads general text, with what was read. Modules
    that read the same input (q/k/v, gate/up) hold the same Gram tensor (:func:`_gram_hooks`)."""
    from lorakit.evaluate.loading import describe_model, load_tokenizer
    from lorakit.merge.in_memory import InMemoryMerge
    from lorakit.merge.linear import LINEAR
    from lorakit.quantize.calibration import general_stream

    tokenizer = load_tokenizer(describe_model(str(base_dir)))
    memory = InMemoryMerge(base_dir, list(adapters), torch.device("cpu"))
    names = memory.names
    grams: list[dict[str, torch.Tensor]] = []
    tokens: list[int] = []
    mask: list[torch.Tensor] = []  # the current batch's real-token mask, flattened, read by the hooks
    decoder = _decoder(memory.model, names)
    owner: dict[str, str] = {}  # which module's Gram each one holds: decided once, the same for every pass
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for i, (adapter, prep) in enumerate(zip(adapters, data)):
        weights = [0.0] * len(adapters)
        weights[i] = 1.0
        memory.apply(LINEAR, weights, {})  # W + ΔWₜ: model t, exactly as the merge writes it
        gram: dict[str, torch.Tensor] = {}
        hooks = _gram_hooks(memory.model, names, gram, mask, owner)
        docs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in _documents(prep, examples)]
        seen = 0
        try:
            for start in progress_bar(range(0, len(docs), BATCH), desc=f"regmean: inputs of {adapter.path.name}",
                                      unit="batch", disable=not progress):
                batch = docs[start:start + BATCH]
                width = max(len(d) for d in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                attn = torch.zeros((len(batch), width), dtype=torch.long)
                for row, d in enumerate(batch):  # right padding: real tokens keep positions 0..len-1
                    ids[row, :len(d)] = torch.tensor(d)
                    attn[row, :len(d)] = 1
                mask[:] = [attn.reshape(-1).bool()]
                decoder(input_ids=ids, attention_mask=attn)  # the output head reads no adapted input
                seen += int(attn.sum())
        finally:
            for h in hooks:
                h.remove()
        grams.append(_share(gram, owner, names))
        tokens.append(seen)
    memory.restore()  # the base's own weights again
    anchor = None
    if anchor_tokens:
        # lorakit's corpus, last documents first, never the ones the release gate scores (calibration's rule)
        stream, info = general_stream("default", tokenizer, int(anchor_tokens), purpose="the RegMean anchor's")
        gram = {}
        hooks = _gram_hooks(memory.model, names, gram, owner=owner)
        try:
            for start in progress_bar(range(0, len(stream), 512), desc="regmean: general-text inputs of the base",
                                      unit="window", disable=not progress):
                decoder(input_ids=torch.tensor([stream[start:start + 512]]))
        finally:
            for h in hooks:
                h.remove()
        anchor = (_share(gram, owner, names), {**info, "tokens": len(stream)})
    return grams, tokens, anchor


def _shrunk(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    return alpha * gram + (1.0 - alpha) * torch.diag(torch.diagonal(gram))


@torch.no_grad()
def project(adapters: Sequence[Adapter], grams: Sequence[dict[str, torch.Tensor]], alpha: float = DEFAULT_ALPHA,
            anchor: dict[str, torch.Tensor] | None = None) -> tuple[list[Adapter], dict[str, Any]]:
    """Each adapter with Aₜ ← Aₜ G̃ₜ S⁻¹ in every module (float64, one solve per module), so that the linear sum
    with weights 1.0 is RegMean's W*; and the per-task residual of that sum (module docstring), computed in
    factor space: ΔW* − ΔWₜ = B_c·A_c has rank ≤ Σrᵢ + rₜ, so ‖Xₜ(ΔW* − ΔWₜ)ᵀ‖² = Σ (B_cᵀB_c) ⊙ (A_c Gₜ A_cᵀ)."""
    names = sorted(adapters[0].modules)
    new_modules: list[dict[str, Any]] = [dict(a.modules) for a in adapters]
    residual: list[list[float]] = [[] for _ in adapters]
    for name in names:
        modules = [a.modules[name] for a in adapters]
        shrunk = [_shrunk(g[name], alpha) for g in grams]
        # A' = A G̃ S⁻¹  ⇔  A'ᵀ = S⁻¹ G̃ Aᵀ (S and G̃ symmetric); every adapter's right-hand side in one solve
        A64 = [m.A.double() for m in modules]
        B64 = [m.scaling * m.B.double() for m in modules]  # sₜ·Bₜ
        rhs = torch.cat([g @ A.T for A, g in zip(A64, shrunk)], dim=1)
        total = sum(shrunk) if anchor is None else sum(shrunk) + _shrunk(anchor[name], alpha)
        solved = torch.linalg.solve(total, rhs).T
        projected = list(torch.split(solved, [m.rank for m in modules], dim=0))
        B_merged = torch.cat(B64, dim=1)
        for t, (m, a) in enumerate(zip(modules, projected)):
            B_t, A_t = B64[t], A64[t]
            B_c = torch.cat([B_merged, -B_t], dim=1)
            A_c = torch.cat([solved, A_t], dim=0)
            gram = grams[t][name]
            num = ((B_c.T @ B_c) * (A_c @ gram @ A_c.T)).sum()
            den = ((B_t.T @ B_t) * (A_t @ gram @ A_t.T)).sum()
            residual[t].append(float((num.clamp_min(0) / den).sqrt()) if float(den) > 0 else 0.0)
            new_modules[t][name] = dataclasses.replace(m, A=a.to(torch.float32))
    out = [dataclasses.replace(a, modules=mods) for a, mods in zip(adapters, new_modules)]
    report = {"residual": [{"mean": sum(r) / len(r), "max": max(r)} for r in residual],
              "residual_definition": "per task t and module: ||X_t (dW* - dW_t)^T|| / ||X_t dW_t^T|| over G_t = X_t^T X_t"}
    return out, report


def regmean_adapters(adapters: Sequence[Adapter], base_dir: Path, data: Sequence[Path], *, alpha: float = DEFAULT_ALPHA,
                     examples: int = DEFAULT_EXAMPLES, anchor: float = DEFAULT_ANCHOR,
                     progress: bool = True) -> tuple[list[Adapter], dict[str, Any]]:
    """Gram matrices, then the projected adapters; the record for lorakit_merge.json.

    ``anchor`` > 0 adds the base's Gram matrix on general text (:func:`collect_grams`) to the fit as a task
    whose update is zero, scaled to ``anchor`` x the tasks' mean token count: the merged update then also keeps the
    base's outputs where general text reads each layer (module docstring)."""
    # every adapter adapts the same modules (the compatibility check)
    check_memory(base_dir, {n: (m.B.shape[0], m.A.shape[1]) for n, m in adapters[0].modules.items()}, len(adapters),
                 anchor)
    grams, tokens, g0_read = collect_grams(base_dir, adapters, data, examples=examples,
                                           anchor_tokens=ANCHOR_TOKENS if float(anchor) > 0 else 0, progress=progress)
    anchor_gram, anchor_record = None, None
    if g0_read is not None:
        g0, info = g0_read
        scale = float(anchor) * (sum(tokens) / len(tokens)) / info["tokens"]
        anchor_gram = {name: g * scale for name, g in g0.items()}
        anchor_record = {"weight": float(anchor), "gram_scale": scale, **info,
                         "definition": "G_0 of the base on general text x weight x (mean task tokens / tokens)"}
    projected, report = project(adapters, grams, alpha, anchor=anchor_gram)
    record = {"alpha": float(alpha), "examples": int(examples), "data": [str(d) for d in data], "split": "train",
              "tokens": tokens, "anchor": anchor_record, **report}
    worst = max(r["max"] for r in report["residual"])
    emit(f"regmean: {sum(tokens)} tokens read; each task's layer outputs move at most {worst:.1%} from its "
         "adapter's (residual)")
    return projected, record


REGMEAN = MergeMethod(
    name="regmean",
    summary="RegMean: per layer, the weights that best keep every adapter's outputs on its own task's inputs "
            "(least squares over --data; each A re-projected, then the exact sum; residual reported)",
    combine=weighted_sum,  # on the projected updates: the linear sum is RegMean's W*
    params=(Param("regmean_alpha", float, DEFAULT_ALPHA, help="off-diagonal scale of the Gram matrices"),
            Param("regmean_examples", int, DEFAULT_EXAMPLES, help="training examples read per task"),
            Param("regmean_anchor", float, DEFAULT_ANCHOR, help="weight of the general-text anchor (0 = off)")),
    factorable=True,
)
