"""AWQ (activation-aware weight quantization) in plain torch: per-channel scales found on calibration data.

Why not the backend: on SmolLM2-135M, one CPU core, GPTQModel's AWQ took 2119 s and this 285 s on its float32
path, 209 s on bfloat16, and GPTQModel's checkpoint lost more perplexity (+13.1% vs +10.4%, both scored by
``lorakit eval`` in float32; bench/results/quantize.json ``awq_speed``, one invocation on a shared machine).
The method itself is cheap: for each group of linears that share an input, AWQ multiplies the input channels of their weights by a scale s (and divides the preceding op by s, which
leaves the fp model unchanged), so the channels that carry large activations lose less to rounding. The groups
of a Llama block:

* q/k/v_proj, scale folded into input_layernorm,
* o_proj, folded into v_proj (only when their sizes match: with grouped-query attention a v channel feeds
  several heads, so AutoAWQ and lorakit leave o_proj unscaled),
* gate/up_proj, folded into post_attention_layernorm,
* down_proj, folded into up_proj.

The scale is s = x̄^α / w̄^(1−α) ("duo scaling", as in AutoAWQ and GPTQModel) or s = x̄^α (the AWQ paper's),
x̄ the mean |activation| per input channel, w̄ the mean group-normalised |weight|; form and α are chosen on a grid
by the error of the linears' outputs after fake quantization. Plain rounding (s = 1) is a candidate too, so the
search never loses to it.

Why the error is measured through a Gram matrix: the output error of a weight error D on inputs X is
‖X Dᵀ‖² = tr(D G Dᵀ) with G = XᵀX. G is accumulated once per input during the block's forward pass, over
*every* calibration token, after which each candidate costs out·in² instead of tokens·out·in and no
activations are kept. That is exact, not an approximation: the error is the same number a forward pass over all
tokens would give. It measures each linear's own output (summed over the linears that share the scale) rather
than AutoAWQ's attention/MLP block output, which needs a block forward per candidate and so, to stay
affordable, a subset of tokens; bench/README.md records the measured perplexity of both.

After the scales, a clipping search shrinks each group's range where that lowers the group's output error
(AutoAWQ's ``auto_clip``), using the Gram matrix's diagonal blocks the same way. The block's fp outputs feed the
next block, as in AutoAWQ.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from lorakit.progress import bar as progress_bar

from lorakit.quantize.options import AWQ_GRID, QUANTIZE
from lorakit.quantize.grid import GroupQuant, fake_quantize, quantize_weight


@dataclass
class AwqParams:
    bits: int = 4
    group_size: int = QUANTIZE.group_size
    sym: bool = False
    n_grid: int = AWQ_GRID
    scale_forms: tuple[str, ...] = ("duo",)  # see search_scale
    clip: bool = True
    clip_grid: int = 20
    clip_max_shrink: float = 0.5
    batch_size: int = 4
    min_zero: int = 0  # 1 when the output layout is GPTQ v1 (see grid.grid_params)
    compute_dtype: str = "auto"  # calibration forwards and search matmuls: auto = bfloat16 where it is fast


@dataclass
class AwqReport:
    alphas: dict[str, float | None] = field(default_factory=dict)  # None: plain rounding (s = 1) won
    forms: dict[str, str | None] = field(default_factory=dict)  # "duo" or "activation" (see search_scale)
    loss_rtn: dict[str, float] = field(default_factory=dict)  # output MSE of plain rounding, per token and output
    loss_best: dict[str, float] = field(default_factory=dict)
    clipped_modules: int = 0
    tokens: int = 0
    compute_dtype: str = ""


class _Stop(Exception):
    pass


def _layer_inputs(model, blocks: torch.Tensor, device: torch.device, batch_size: int):
    """Hidden states entering block 0 for every sample, and the extra arguments the blocks are called with."""
    layers = model.model.layers
    captured: list[torch.Tensor] = []
    kwargs_box: dict = {}

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        captured.append(hidden.detach())
        if not kwargs_box:
            kwargs_box.update({k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values",
                                                                             "past_key_value", "use_cache")})
        raise _Stop

    # The first call has batch size 1, so the captured extras (rotary tables, any mask) broadcast to every batch.
    bounds = [0, 1, *range(1 + batch_size, blocks.shape[0], batch_size), blocks.shape[0]]
    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start, stop in zip(bounds, bounds[1:]):
            if stop <= start:
                continue
            try:
                model(blocks[start:stop].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return torch.cat(captured), kwargs_box


class InputStats:
    """What AWQ needs to know about one linear input: Σ|x| per channel and the Gram matrix XᵀX, over all tokens."""

    def __init__(self, features: int, device: torch.device):
        self.abs_sum = torch.zeros(features, device=device)
        self.gram = torch.zeros(features, features, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Accumulate a batch of activations. Float32 activations are summed exactly in float32; bfloat16 ones
        (bfloat16 forwards) are multiplied in bfloat16, where the products are exact and only each batch's
        result is rounded (relative ~1e-3 per entry, random in sign) before float32 accumulation."""
        x = x.reshape(-1, x.shape[-1])
        self.abs_sum += x.abs().float().sum(dim=0)
        if x.dtype == torch.float32:
            self.gram.addmm_(x.t(), x)
        else:
            self.gram += (x.t() @ x).float()
        self.tokens += x.shape[0]

    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / self.tokens

    def mean_gram(self) -> torch.Tensor:
        return self.gram / self.tokens


def output_mse(weights: list[torch.Tensor], approx: list[torch.Tensor], gram: torch.Tensor) -> float:
    """Mean over tokens and output features of (x·(Ŵ − W)ᵀ)², from the per-token Gram matrix E[xᵀx].

    The matmul runs in ``gram``'s dtype: bfloat16 halves the search's time on CPUs with bfloat16 units at a
    relative error of about 1e-4 in the loss (tested), far below the differences between candidate scales.
    """
    total, outs = 0.0, 0
    for w, q in zip(weights, approx):
        d = q - w
        total += float(((d.to(gram.dtype) @ gram).float() * d).sum())
        outs += w.shape[0]
    return total / outs


def _weight_mean(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Mean over output rows of |w| normalised by its group's max |w|: the w̄ of duo scaling."""
    total = torch.zeros(weights[0].shape[1], device=weights[0].device)
    rows = 0
    for w in weights:
        g = w.abs().view(w.shape[0], -1, group_size)
        total += (g / g.amax(dim=-1, keepdim=True).clamp(min=1e-12)).view(w.shape).sum(dim=0)
        rows += w.shape[0]
    return total / rows


def _scaled_rounding(weights: list[torch.Tensor], s: torch.Tensor, p: AwqParams) -> list[torch.Tensor]:
    """Each weight as the model will compute with it: fake-quantized after scaling by s, then unscaled."""
    s = s.view(1, -1)
    return [fake_quantize(w * s, p.bits, p.group_size, p.sym, p.min_zero) / s for w in weights]


@torch.no_grad()
def search_scale(weights: list[torch.Tensor], stats: InputStats, p: AwqParams, dtype: torch.dtype = torch.float32
                 ) -> tuple[torch.Tensor | None, float | None, str | None, float, float]:
    """Best scale for linears sharing one input: (s or None for plain rounding, α, form, RTN loss, best loss).

    Two forms of scale can be on the grid: "duo" s = x̄^α / w̄^(1−α) (AutoAWQ's and GPTQModel's default, and
    lorakit's) and "activation" s = x̄^α (the AWQ paper's). Neither wins everywhere on SmolLM2-135M's held-out
    perplexity (4-bit g64: duo 9.151 vs activation 9.263; g32: activation 8.733 vs duo 8.901), and letting the
    output error pick the form per group did not beat the better one (g64: 9.216), so the form is the user's
    choice (``--awq-scale-form``; bench/results/quantize.json ``awq_development_runs``).
    """
    gram = stats.mean_gram().to(dtype)
    x_mean = stats.mean_abs()
    w_mean = _weight_mean(weights, p.group_size) if "duo" in p.scale_forms else None
    loss_rtn = output_mse(weights, [fake_quantize(w, p.bits, p.group_size, p.sym, p.min_zero) for w in weights], gram)
    best: tuple[torch.Tensor | None, float | None, str | None, float] = (None, None, None, loss_rtn)
    for form in p.scale_forms:
        for i in range(p.n_grid):
            alpha = i / p.n_grid
            s = x_mean.pow(alpha)
            if form == "duo":
                s = s / (w_mean.pow(1 - alpha) + 1e-4)
            elif form != "activation":
                raise ValueError(f"unknown AWQ scale form {form!r}; use 'duo' and/or 'activation'")
            s = s.clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            loss = output_mse(weights, _scaled_rounding(weights, s, p), gram)
            if loss < best[3]:
                best = (s, alpha, form, loss)
    return best[0], best[1], best[2], loss_rtn, best[3]


def _diagonal_blocks(gram: torch.Tensor, group_size: int) -> torch.Tensor:
    n = gram.shape[0] // group_size
    idx = torch.arange(n, device=gram.device)
    return gram.view(n, group_size, n, group_size)[idx, :, idx, :]  # [n, g, g]


@torch.no_grad()
def search_clip(lin: nn.Linear, gram: torch.Tensor, p: AwqParams) -> bool:
    """Shrink each group's range (max |w| · (1 − k/n)) where that lowers that group's output error.

    Clipping applies before the grid is computed, so it acts like choosing a smaller range per group; AutoAWQ
    does the same with its ``auto_clip``. A group's contribution to the output error only involves its own
    input channels, i.e. one diagonal block of the Gram matrix. ``gram`` is the (per-token) Gram matrix of the
    input this linear sees *now* (after any folded scale). The weight is modified in place; returns whether any
    group changed.
    """
    w = lin.weight.detach().float()
    out_f, in_f = w.shape
    g = p.group_size
    blocks = _diagonal_blocks(gram, g)  # [G, g, g]
    wg = w.view(out_f, in_f // g, g)
    absmax = wg.abs().amax(dim=-1, keepdim=True)
    best_err = torch.full((out_f, in_f // g), float("inf"), device=w.device)
    best_max = absmax.clone()
    for i in range(int(p.clip_max_shrink * p.clip_grid) + 1):
        cur = absmax * (1 - i / p.clip_grid)
        clipped = torch.maximum(torch.minimum(wg, cur), -cur).reshape(out_f, in_f)
        d = fake_quantize(clipped, p.bits, g, p.sym, p.min_zero).view(out_f, in_f // g, g) - wg
        err = (torch.einsum("oGk,Gkl->oGl", d, blocks) * d).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better.unsqueeze(-1), cur, best_max)
    changed = bool((best_max < absmax).any())
    if changed:
        clipped = torch.maximum(torch.minimum(wg, best_max), -best_max).reshape(out_f, in_f)
        lin.weight.copy_(clipped.to(lin.weight.dtype))
    return changed


def _norm_fold(norm: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    norm.weight.div_(s.to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s.to(norm.bias.dtype))
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight.dtype).view(1, -1))


def _linear_fold(prev: nn.Linear, linears: list[nn.Linear], s: torch.Tensor) -> None:
    prev.weight.div_(s.to(prev.weight.dtype).view(-1, 1))
    if prev.bias is not None:
        prev.bias.div_(s.to(prev.bias.dtype))
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight.dtype).view(1, -1))


_FULL = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
         "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
# Linears that share an input, keyed by the one whose input is hooked.
_INPUT_OF = {"q": "q", "k": "q", "v": "q", "o": "o", "gate": "gate", "up": "gate", "down": "down"}
# q/k are not clipped: attention scores are sensitive to it (as in AutoAWQ).
_CLIPPED = ("v", "o", "gate", "up", "down")


# The dtypes AWQ's search accepts: float16 has too little range for the Gram matrices of large activations.
AWQ_COMPUTE_DTYPES = ("auto", "float32", "bfloat16")


def compute_dtype(requested: str, device: torch.device) -> torch.dtype:
    """The dtype of the calibration forwards and of the search's large matmuls (Gram matrices, candidate errors).

    Resolved by :func:`lorakit.compute.resolve_compute_dtype` for the quantize stage: ``auto`` is bfloat16 where
    it is fast there. Those matmuls are most of AWQ's time: on a CPU with AVX512-BF16 bfloat16 made the whole
    SmolLM2-135M run 1.8x faster (145 s -> 80 s, bench/results/quantize.json ``awq_development_runs``).
    Statistics are accumulated, and scales, clipping and the quantized weights computed, in float32; GPTQModel and
    AutoAWQ run the whole model in 16-bit. Float32 where bfloat16 has no fast path (there it is slower, not
    faster), or when asked for: float32 makes the search's errors exact.
    """
    from lorakit.compute import resolve_compute_dtype

    if requested not in AWQ_COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {', '.join(AWQ_COMPUTE_DTYPES)} for AWQ, got {requested!r}")
    return resolve_compute_dtype(requested, "quantize", device)


def _cast_floats(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floats(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast_floats(v, dtype) for k, v in value.items()}
    return value


@torch.no_grad()
def _collect_stats(layer: nn.Module, inps: torch.Tensor, kwargs: dict, batch_size: int,
                   device: torch.device) -> tuple[dict[str, InputStats], torch.Tensor]:
    """One forward of the block over every sample: input statistics per shared input, and the block output.

    The forward runs on a copy of the block in the inputs' dtype; ``layer`` itself keeps its float32 weights.
    """
    fwd = layer if inps.dtype == torch.float32 else copy.deepcopy(layer).to(inps.dtype)
    names = _linears(fwd)
    stats = {k: InputStats(names[k].in_features, device) for k in sorted(set(_INPUT_OF.values()))}
    handles = [names[k].register_forward_pre_hook(lambda _m, args, k=k: stats[k].add(args[0])) for k in stats]
    kwargs = _cast_floats(kwargs, inps.dtype)
    outs = []
    try:
        for start in range(0, inps.shape[0], batch_size):
            out = fwd(inps[start:start + batch_size], **kwargs)
            outs.append((out[0] if isinstance(out, tuple) else out).detach())
    finally:
        for h in handles:
            h.remove()
    return stats, torch.cat(outs)


def _linears(layer: nn.Module) -> dict[str, nn.Linear]:
    attn, mlp = layer.self_attn, layer.mlp
    return {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "o": attn.o_proj,
            "gate": mlp.gate_proj, "up": mlp.up_proj, "down": mlp.down_proj}


@torch.no_grad()
def awq_quantize(model, blocks: torch.Tensor, p: AwqParams, *, device: torch.device,
                 progress: bool = True, keep: frozenset[str] = frozenset()) -> tuple[dict[str, GroupQuant], AwqReport]:
    """Search and fold AWQ scales into ``model`` (in place) and quantize its decoder linears.

    Returns {module name: integers and grid} for every quantized linear; norms and preceding linears of
    ``model`` now hold the folded scales and must be saved with the quantized weights. Modules named in ``keep``
    (full names) stay unquantized and unclipped; they still carry their folded scales, which is exact in fp.
    """
    report = AwqReport()
    layers = model.model.layers
    inps, kwargs = _layer_inputs(model, blocks, device, p.batch_size)
    inps = inps.to(compute_dtype(p.compute_dtype, device))
    report.compute_dtype = str(inps.dtype).removeprefix("torch.")
    report.tokens = int(inps.shape[0] * inps.shape[1])
    results: dict[str, GroupQuant] = {}
    bar = progress_bar(total=len(layers), desc="AWQ: quantizing layers", unit="layer", disable=not progress)
    for idx, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        names = _linears(layer)
        stats, inps_next = _collect_stats(layer, inps, kwargs, p.batch_size, device)
        # (label, linears scaled together, how the scale is folded into the preceding op)
        groups: list[tuple[str, list[str], Callable[[torch.Tensor], None]]] = [
            ("self_attn.qkv", ["q", "k", "v"], lambda s: _norm_fold(layer.input_layernorm, [attn.q_proj, attn.k_proj,
                                                                                              attn.v_proj], s)),
            ("mlp.gate_up", ["gate", "up"], lambda s: _norm_fold(layer.post_attention_layernorm,
                                                                 [mlp.gate_proj, mlp.up_proj], s)),
            ("mlp.down_proj", ["down"], lambda s: _linear_fold(mlp.up_proj, [mlp.down_proj], s)),
        ]
        if attn.v_proj.out_features == attn.o_proj.in_features:
            groups.insert(1, ("self_attn.o_proj", ["o"], lambda s: _linear_fold(attn.v_proj, [attn.o_proj], s)))
        # Search every group against the unmodified block first, then fold: folding changes no fp output.
        scale_of: dict[str, torch.Tensor] = {}
        for label, keys, fold in groups:
            weights = [names[k].weight.detach().float() for k in keys]
            s, alpha, form, loss_rtn, loss = search_scale(weights, stats[_INPUT_OF[keys[0]]], p, inps.dtype)
            key = f"model.layers.{idx}.{label}"
            report.alphas[key], report.loss_rtn[key], report.loss_best[key] = alpha, loss_rtn, loss
            report.forms[key] = form
            if s is not None:
                fold(s)
                scale_of[_INPUT_OF[keys[0]]] = s
        if p.clip:
            # After a fold, a linear's input is its captured input divided by s: the Gram matrix scales by 1/(s sᵀ).
            for key in _CLIPPED:
                if f"model.layers.{idx}.{_FULL[key]}" in keep:
                    continue
                src = _INPUT_OF[key]
                gram = stats[src].mean_gram()
                if src in scale_of:
                    inv = 1.0 / scale_of[src]
                    gram = gram * inv.view(-1, 1) * inv.view(1, -1)
                report.clipped_modules += search_clip(names[key], gram, p)
        for key, lin in names.items():
            if f"model.layers.{idx}.{_FULL[key]}" in keep:
                continue
            results[f"model.layers.{idx}.{_FULL[key]}"] = quantize_weight(lin.weight.detach().float().cpu(), p.bits,
                                                                          p.group_size, p.sym, p.min_zero)
        inps = inps_next
        bar.update(1)
    bar.close()
    return results, report
