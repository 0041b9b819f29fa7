"""A small, deterministic Nelder–Mead minimiser inside a box, for the merge-weight search.

Why Nelder–Mead: the objective (the worst task's retention) is a minimum of smooth per-task curves, so its
optimum usually sits on a ridge where two tasks tie; moving one weight at a time (coordinate search) stalls on
such a ridge, while a simplex learns the ridge's direction. It needs no gradients and no randomness, so the same
inputs give the same trials. Every point is clipped into ``[lo, hi]`` and rounded to ``decimals`` before it is
evaluated, so a recorded point is exactly the point that was measured. The caller's ``f`` may raise
:class:`Exhausted` to stop (trial or time bound); the best point seen is whatever the caller recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class Exhausted(Exception):
    """Raised by the objective when the search may not evaluate another point."""


def _clip(x: Sequence[float], lo: Sequence[float], hi: Sequence[float], decimals: int) -> tuple[float, ...]:
    return tuple(round(min(max(v, a), b), decimals) for v, a, b in zip(x, lo, hi))


def initial_simplex(x0: Sequence[float], steps: Sequence[float], lo: Sequence[float], hi: Sequence[float],
                    decimals: int) -> list[tuple[float, ...]]:
    """``x0`` and one vertex per coordinate, moved by its step (the other way when that would leave the box)."""
    start = _clip(x0, lo, hi, decimals)
    out = [start]
    for i, step in enumerate(steps):
        v = list(start)
        v[i] = start[i] + step if start[i] + step <= hi[i] else start[i] - step
        out.append(_clip(v, lo, hi, decimals))
    return out


def minimize(f: Callable[[tuple[float, ...]], float], x0: Sequence[float], steps: Sequence[float],
             lo: Sequence[float], hi: Sequence[float], *, decimals: int = 4, xtol: float = 0.01,
             max_iter: int = 1000) -> tuple[tuple[float, ...], float]:
    """Minimise ``f`` from ``x0``; stops when every vertex is within ``xtol`` of the best (per coordinate),
    after ``max_iter`` iterations, or when ``f`` raises :class:`Exhausted` (then re-raised)."""
    simplex = initial_simplex(x0, steps, lo, hi, decimals)
    values = [f(v) for v in simplex]
    for _ in range(max_iter):
        order = sorted(range(len(simplex)), key=lambda k: (values[k], k))
        simplex, values = [simplex[k] for k in order], [values[k] for k in order]
        best, worst = simplex[0], simplex[-1]
        if all(abs(a - b) <= xtol for v in simplex[1:] for a, b in zip(v, best)):
            break
        n = len(best)
        centroid = [sum(v[i] for v in simplex[:-1]) / n for i in range(n)]

        def along(t: float) -> tuple[float, ...]:
            return _clip([c + t * (c - w) for c, w in zip(centroid, worst)], lo, hi, decimals)

        reflected = along(1.0)
        fr = f(reflected)
        if fr < values[0]:
            expanded = along(2.0)
            fe = f(expanded)
            simplex[-1], values[-1] = (expanded, fe) if fe < fr else (reflected, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = reflected, fr
        else:
            contracted = along(0.5) if fr < values[-1] else along(-0.5)
            fc = f(contracted)
            if fc < min(fr, values[-1]):
                simplex[-1], values[-1] = contracted, fc
            else:  # shrink towards the best vertex
                for k in range(1, len(simplex)):
                    simplex[k] = _clip([b + 0.5 * (v - b) for b, v in zip(best, simplex[k])], lo, hi, decimals)
                    values[k] = f(simplex[k])
    k = min(range(len(simplex)), key=lambda j: (values[j], j))
    return simplex[k], values[k]
