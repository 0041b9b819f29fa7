"""AWQ (activation-aware weight quantization) in plain torch: per-channel scales found on calibration data.

Why not the backend: GPTQModel's AWQ runs for 80+ minutes on a CPU for a 135M model (see bench/README.md).
The method itself is cheap: for each group of linears that share an input, AWQ multiplies the input channels
of their weights by s = mean|x|^α (and divides the preceding op by s, which leaves the fp model unchanged), so
the channels that carry large activations lose less to rounding. α is chosen per group on a grid by the error
of the group's output after fake quantization. The groups of a Llama block:

* q/k/v_proj, scale folded into input_layernorm (loss on the attention output),
* o_proj, folded into v_proj (only when their sizes match: with grouped-query attention a v channel feeds
  several heads, so AutoAWQ and lorakit leave o_proj unscaled),
* gate/up_proj, folded into post_attention_layernorm (loss on the MLP output),
* down_proj, folded into up_proj.

Activation statistics use every calibration token; the α search evaluates the loss on the first
``search_tokens`` tokens (whole sequences, attention needs them) to keep a CPU run to minutes. After the scales,
an optional clipping search shrinks each group's range where that lowers the output error (AutoAWQ's
``auto_clip``). The block's fp outputs feed the next block, as in AutoAWQ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lorakit.quantize.grid import GroupQuant, fake_quantize, quantize_weight


@dataclass
class AwqParams:
    bits: int = 4
    group_size: int = 128
    sym: bool = False
    n_grid: int = 20
    search_tokens: int = 2048
    clip: bool = True
    clip_grid: int = 10
    clip_max_shrink: float = 0.5
    batch_size: int = 4
    min_zero: int = 0  # 1 when the output layout is GPTQ v1 (see grid.grid_params)


@dataclass
class AwqReport:
    alphas: dict[str, float] = field(default_factory=dict)
    loss_fp_grid: dict[str, float] = field(default_factory=dict)  # output MSE with α = 0 (plain rounding)
    loss_best: dict[str, float] = field(default_factory=dict)
    clipped_modules: int = 0


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


@torch.no_grad()
def _search_scale(linears: list[nn.Linear], x_mean: torch.Tensor, inputs: torch.Tensor,
                  run: Callable[[torch.Tensor], torch.Tensor], p: AwqParams) -> tuple[torch.Tensor, float, float, float]:
    """Best s = x_mean^α over the grid; returns (s, α, loss at α=0, best loss)."""
    reference = run(inputs)
    originals = [lin.weight.detach().clone() for lin in linears]
    best = (None, 0.0, float("inf"))
    loss0 = float("nan")
    try:
        for i in range(p.n_grid):
            alpha = i / p.n_grid
            s = x_mean.pow(alpha).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            for lin, w in zip(linears, originals):
                scaled = w * s.view(1, -1)
                lin.weight.copy_(fake_quantize(scaled, p.bits, p.group_size, p.sym, p.min_zero) / s.view(1, -1))
            loss = (run(inputs) - reference).float().pow(2).mean().item()
            if i == 0:
                loss0 = loss
            if loss < best[2]:
                best = (s.clone(), alpha, loss)
    finally:
        for lin, w in zip(linears, originals):
            lin.weight.copy_(w)
    return best[0], best[1], loss0, best[2]


@torch.no_grad()
def _search_clip(lin: nn.Linear, inputs: torch.Tensor, p: AwqParams) -> bool:
    """Shrink each group's range (max |w| · (1 − k/n)) where that lowers that group's output error.

    Clipping applies before the grid is computed, so it acts like choosing a smaller range per group; AutoAWQ
    does the same with its ``auto_clip``. The weight is modified in place; returns whether any group changed.
    """
    w = lin.weight.detach().float()
    out_f, in_f = w.shape
    g = p.group_size
    x = inputs.reshape(-1, in_f).float()
    step = max(1, x.shape[0] // 512)
    x = x[::step][:512]  # a token subset is enough to rank a handful of shrink factors per group
    xg = x.view(-1, in_f // g, g)  # [t, G, g]
    wg = w.view(out_f, in_f // g, g)  # [o, G, g]
    ref = torch.einsum("tGk,oGk->oGt", xg, wg)
    absmax = wg.abs().amax(dim=-1, keepdim=True)
    best_err = torch.full((out_f, in_f // g), float("inf"), device=w.device)
    best_max = absmax.clone()
    for i in range(int(p.clip_max_shrink * p.clip_grid) + 1):
        cur = absmax * (1 - i / p.clip_grid)
        clipped = torch.maximum(torch.minimum(wg, cur), -cur).reshape(out_f, in_f)
        q = fake_quantize(clipped, p.bits, g, p.sym, p.min_zero).view(out_f, in_f // g, g)
        err = (torch.einsum("tGk,oGk->oGt", xg, q) - ref).pow(2).mean(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better.unsqueeze(-1), cur, best_max)
    changed = bool((best_max < absmax).any())
    if changed:
        clipped = torch.maximum(torch.minimum(wg, best_max), -best_max).reshape(out_f, in_f)
        lin.weight.copy_(clipped.to(lin.weight.dtype))
    return changed


def _run_batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch]) for i in range(0, x.shape[0], batch)])


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
    n_search = max(1, min(inps.shape[0], -(-p.search_tokens // blocks.shape[1])))
    results: dict[str, GroupQuant] = {}
    bar = tqdm(total=len(layers), desc="AWQ: quantizing layers", unit="layer", disable=not progress)
    for idx, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        names = {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "o": attn.o_proj,
                 "gate": mlp.gate_proj, "up": mlp.up_proj, "down": mlp.down_proj}
        # One input per group: q's input is k's and v's too, gate's is up's.
        sums = {k: torch.zeros(names[k].in_features, device=device) for k in ("q", "o", "gate", "down")}
        kept: dict[str, list[torch.Tensor]] = {k: [] for k in sums}
        seen = {"n": 0}

        def make_hook(key):
            def hook(_m, args):
                x = args[0]
                sums[key] += x.abs().reshape(-1, x.shape[-1]).float().sum(dim=0)
                if seen["n"] < n_search:
                    kept[key].append(x.detach())
            return hook

        handles = [names[k].register_forward_pre_hook(make_hook(k)) for k in sums]
        outs = []
        try:
            for start in range(0, inps.shape[0], p.batch_size):
                x = inps[start:start + p.batch_size]
                out = layer(x, **kwargs)
                outs.append((out[0] if isinstance(out, tuple) else out).detach())
                seen["n"] += x.shape[0]
        finally:
            for h in handles:
                h.remove()
        n_tokens = inps.shape[0] * inps.shape[1]
        x_mean = {k: v / n_tokens for k, v in sums.items()}
        sub = {k: torch.cat(v)[:n_search] for k, v in kept.items()}

        def attn_out(x):
            return attn(x, **kwargs)[0]

        qkv, gate_up = [names["q"], names["k"], names["v"]], [names["gate"], names["up"]]
        # (label, linears scaled together, their search inputs, activation means, what the loss is measured on,
        #  how the scale is folded into the preceding op)
        groups = [
            ("self_attn.qkv", ["q", "k", "v"], sub["q"], x_mean["q"], lambda x: _run_batched(attn_out, x, p.batch_size),
             lambda s: _norm_fold(layer.input_layernorm, qkv, s)),
            ("mlp.gate_up", ["gate", "up"], sub["gate"], x_mean["gate"], lambda x: _run_batched(mlp, x, p.batch_size),
             lambda s: _norm_fold(layer.post_attention_layernorm, gate_up, s)),
            ("mlp.down_proj", ["down"], sub["down"], x_mean["down"], names["down"],
             lambda s: _linear_fold(names["up"], [names["down"]], s)),
        ]
        if names["v"].out_features == names["o"].in_features:
            groups.insert(1, ("self_attn.o_proj", ["o"], sub["o"], x_mean["o"], names["o"],
                              lambda s: _linear_fold(names["v"], [names["o"]], s)))
        # Search every group against the unmodified block first, then fold: folding changes no fp output.
        found = []
        for label, keys, x_sub, xm, run, fold in groups:
            s, alpha, loss0, loss = _search_scale([names[k] for k in keys], xm, x_sub, run, p)
            found.append((fold, s))
            report.alphas[f"model.layers.{idx}.{label}"] = alpha
            report.loss_fp_grid[f"model.layers.{idx}.{label}"] = loss0
            report.loss_best[f"model.layers.{idx}.{label}"] = loss
        for fold, s in found:
            fold(s)
        if p.clip:
            # A linear's input after the folds is its captured input divided by its group's scale (the block's fp
            # function is unchanged). q/k are not clipped: attention scores are sensitive to it (as in AutoAWQ).
            scale_of = {keys[0]: s for (_label, keys, *_), (_fold, s) in zip(groups, found)}
            for key, src in (("v", "q"), ("o", "o"), ("gate", "gate"), ("up", "gate"), ("down", "down")):
                if f"model.layers.{idx}.{_FULL[key]}" in keep:
                    continue
                s = scale_of.get(src)
                x = sub[src] / s.view(1, 1, -1) if s is not None else sub[src]
                report.clipped_modules += _search_clip(names[key], x, p)
        for key, lin in names.items():
            if f"model.layers.{idx}.{_FULL[key]}" in keep:
                continue
            results[f"model.layers.{idx}.{_FULL[key]}"] = quantize_weight(lin.weight.detach().float().cpu(), p.bits,
                                                                          p.group_size, p.sym, p.min_zero)
        inps = torch.cat(outs)
        bar.update(1)
    bar.close()
    return results, report


_FULL = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
         "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
