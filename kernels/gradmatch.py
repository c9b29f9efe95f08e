"""Fused multi-tensor gradient matching in Triton: kernels, launcher and autograd.Function.

Forward: two launches for any number of layers and restarts.

1. `_stats_kernel` runs one program per (chunk, restart). A chunk is up to `CHUNK` consecutive
   elements of one layer; the chunk table (layer, start) depends only on the target shapes and is
   built once per `PackedTargets`. Each program reads its slice of the candidate and of the
   packed target once and writes three partial sums (dot, cc, dd) for its chunk.
2. `_finalize_kernel` runs one program per restart: it sums the chunk partials of every layer
   in a fixed order (no atomics, so results are bitwise reproducible), then computes the loss and
   two coefficients per layer, a_l and b_l, with dLoss/dc_l = a_l t_l + b_l c_l. These mirror
   `reference.matching_loss_from_statistics` and its autograd derivatives in closed form.

Backward: one launch of `_backward_kernel` over the same chunk table, which writes
g_r (a_l t_l + b_l c_l) into one flat buffer that is handed back as per-layer views.

Candidates are not concatenated: the launcher passes a table of the candidate tensors' data
pointers (an int64 tensor of shape (2, L): pointer, alignment flag). Concatenating would read and
write the whole candidate once more per call, doubling the forward's memory traffic for the sake
of a table of L integers. The table is cached per `PackedTargets` by pointer values, and the
caching allocator hands the same addresses back every iteration, so in steady state no host to
device copy happens at all; on a miss it is one pinned, non-blocking copy. A layer whose rows
are 16-byte aligned takes a vectorised path (`tl.multiple_of` hints, unmasked full blocks); any
other layer takes a masked path that is correct for every address.

The Function is differentiable once: its backward gives dLoss/dcandidate exactly, and autograd
carries that on through the candidate gradients' `create_graph` graph to the images, which is
all gradient inversion needs. The backward runs through a second Function, so that torch.func
transforms (grad, vmap) hand the kernels plain tensors; differentiating that one raises. Both
Functions have a `vmap` staticmethod that folds the vmapped dimension into the restart dimension
and calls the batched kernels once.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import triton
import triton.language as tl

from kernels.errors import BackendUnavailableError, KernelInputError
from kernels.reference import TINY, Cost, accumulation_dtype
from kernels.targets import PackedTargets

CHUNK = 8192  # elements of one layer per program
BLOCK = 2048  # elements per loop step; CHUNK is a multiple of it, so chunk starts are aligned
NUM_WARPS = 8
_POINTER_CACHE_SIZE = 16

_COST_CODE = {"l2": 0, "cosine": 1, "cosine_global": 2}
TL_DTYPES: dict[torch.dtype, Any] = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}
SUPPORTED_DTYPES = tuple(TL_DTYPES)


@triton.jit
def _stats_kernel(
    cand_table,  # int64 (2, L): data pointer of candidate layer l, 1 if its rows are 16-byte aligned
    target,  # packed targets, layer l at t_offsets[l]
    t_offsets,
    numels,
    chunk_layer,
    chunk_start,
    partials,  # (3, R, C): dot, cc, dd of every chunk and restart
    R,
    C,
    L,
    CAND_DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    chunk = pid // R
    r = pid % R
    layer = tl.load(chunk_layer + chunk)
    start = tl.load(chunk_start + chunk)
    n = tl.load(numels + layer)
    end = tl.minimum(start + CHUNK, n)
    c_row = tl.load(cand_table + layer).to(tl.pointer_type(CAND_DTYPE)) + r * n
    t_row = target + tl.multiple_of(tl.load(t_offsets + layer), 16)
    dot = tl.zeros([BLOCK], ACC)
    cc = tl.zeros([BLOCK], ACC)
    dd = tl.zeros([BLOCK], ACC)
    if tl.load(cand_table + L + layer) != 0:
        c_row = tl.multiple_of(c_row, 16)
        full_end = start + (end - start) // BLOCK * BLOCK
        # the hint must sit on the loop's lower bound: on the induction variable it is lost
        for off in range(tl.multiple_of(start, BLOCK), full_end, BLOCK):
            offs = off + tl.arange(0, BLOCK)
            c = tl.load(c_row + offs).to(ACC)
            t = tl.load(t_row + offs).to(ACC)
            diff = c - t
            dot += c * t
            cc += c * c
            dd += diff * diff
        start = full_end
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        mask = offs < end
        c = tl.load(c_row + offs, mask=mask, other=0.0).to(ACC)
        t = tl.load(t_row + offs, mask=mask, other=0.0).to(ACC)
        diff = c - t
        dot += c * t
        cc += c * c
        dd += diff * diff
    out = partials + r * C + chunk
    tl.store(out, tl.sum(dot, axis=0))
    tl.store(out + R * C, tl.sum(cc, axis=0))
    tl.store(out + 2 * R * C, tl.sum(dd, axis=0))


@triton.jit
def _finalize_kernel(
    partials,
    first_chunk,  # first chunk index of each layer; its chunks are consecutive
    num_chunks,
    sq_norms,
    weights,
    loss,  # (R,)
    coef,  # (2, R, L): a and b, for an upstream gradient of 1
    R,
    C,
    L,
    max_chunks,
    constants,  # (eps, TINY) in the accumulation dtype: a float argument would arrive as fp32
    COST: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    r = tl.program_id(0)
    lanes = tl.arange(0, BLOCK_L)
    in_l = lanes < L
    first = tl.load(first_chunk + lanes, mask=in_l, other=0)
    count = tl.load(num_chunks + lanes, mask=in_l, other=0)
    dot = tl.zeros([BLOCK_L], ACC)
    cc = tl.zeros([BLOCK_L], ACC)
    dd = tl.zeros([BLOCK_L], ACC)
    for k0 in range(0, max_chunks, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask = in_l[:, None] & (ks[None, :] < count[:, None])
        idx = r * C + first[:, None] + ks[None, :]
        dot += tl.sum(tl.load(partials + idx, mask=mask, other=0.0), axis=1)
        cc += tl.sum(tl.load(partials + R * C + idx, mask=mask, other=0.0), axis=1)
        dd += tl.sum(tl.load(partials + 2 * R * C + idx, mask=mask, other=0.0), axis=1)
    tt = tl.load(sq_norms + lanes, mask=in_l, other=0.0).to(ACC)
    w = tl.load(weights + lanes, mask=in_l, other=0.0).to(ACC)
    eps = tl.load(constants)
    tiny = tl.load(constants + 1)
    if COST == 0:
        value = tl.sum(w * dd, axis=0)
        a = -2.0 * w
        b = 2.0 * w
    elif COST == 1:
        prod = tl.sqrt(tl.maximum(cc, tiny)) * tl.sqrt(tt)
        denom = tl.maximum(prod, eps)
        value = tl.sum(w * (1.0 - dot / denom), axis=0)
        a = -w / denom
        b = tl.where((prod > eps) & (cc > tiny), w * (dot / denom) / tl.maximum(cc, tiny), 0.0)
    else:
        s_dot = tl.sum(w * dot, axis=0)
        s_cc = tl.sum(w * cc, axis=0)
        s_tt = tl.sum(w * tt, axis=0)
        prod = tl.sqrt(tl.maximum(s_cc, tiny)) * tl.sqrt(s_tt)
        denom = tl.maximum(prod, eps)
        value = 1.0 - s_dot / denom
        a = -w / denom
        b = tl.where((prod > eps) & (s_cc > tiny), w * ((s_dot / denom) / tl.maximum(s_cc, tiny)), 0.0)
    tl.store(loss + r, value)
    tl.store(coef + r * L + lanes, a, mask=in_l)
    tl.store(coef + R * L + r * L + lanes, b, mask=in_l)


@triton.jit
def _backward_kernel(
    cand_table,
    target,
    t_offsets,
    numels,
    chunk_layer,
    chunk_start,
    coef,
    grad_loss,
    grad_stride,
    out,  # flat, layer l's (R, n_l) block at R * t_offsets[l]
    R,
    L,
    CAND_DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    chunk = pid // R
    r = pid % R
    layer = tl.load(chunk_layer + chunk)
    start = tl.load(chunk_start + chunk)
    n = tl.load(numels + layer)
    end = tl.minimum(start + CHUNK, n)
    g = tl.load(grad_loss + r * grad_stride).to(ACC)
    a = tl.load(coef + r * L + layer).to(ACC) * g
    b = tl.load(coef + R * L + r * L + layer).to(ACC) * g
    t_off = tl.multiple_of(tl.load(t_offsets + layer), 16)
    c_row = tl.load(cand_table + layer).to(tl.pointer_type(CAND_DTYPE)) + r * n
    t_row = target + t_off
    o_row = out + R * t_off + r * n
    if tl.load(cand_table + L + layer) != 0:
        c_row = tl.multiple_of(c_row, 16)
        o_row = tl.multiple_of(o_row, 16)
        full_end = start + (end - start) // BLOCK * BLOCK
        # the hint must sit on the loop's lower bound: on the induction variable it is lost
        for off in range(tl.multiple_of(start, BLOCK), full_end, BLOCK):
            offs = off + tl.arange(0, BLOCK)
            c = tl.load(c_row + offs).to(ACC)
            t = tl.load(t_row + offs).to(ACC)
            tl.store(o_row + offs, (a * t + b * c).to(CAND_DTYPE))
        start = full_end
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        mask = offs < end
        c = tl.load(c_row + offs, mask=mask, other=0.0).to(ACC)
        t = tl.load(t_row + offs, mask=mask, other=0.0).to(ACC)
        tl.store(o_row + offs, (a * t + b * c).to(CAND_DTYPE), mask=mask)


INTERPRETED: bool = type(_stats_kernel).__name__ == "InterpretedFunction"
"""True when Triton was imported with TRITON_INTERPRET=1: the kernels then run on CPU tensors."""


def check_runnable(tensors: Sequence[torch.Tensor]) -> None:
    """Raise BackendUnavailableError unless the Triton kernels can run on these tensors here."""
    device = tensors[0].device
    if INTERPRETED:
        if device.type != "cpu":
            raise BackendUnavailableError(
                "the Triton interpreter (TRITON_INTERPRET=1) runs gradleak's kernels on CPU tensors only"
            )
    elif device.type != "cuda":
        raise BackendUnavailableError(
            f"backend='triton' needs CUDA tensors, got {device.type} tensors; set TRITON_INTERPRET=1 "
            "before triton is first imported to run the kernels on CPU through the interpreter"
        )


@dataclass(frozen=True)
class _ChunkTable:
    t_offsets: torch.Tensor
    numels: torch.Tensor
    chunk_layer: torch.Tensor
    chunk_start: torch.Tensor
    first_chunk: torch.Tensor
    num_chunks: torch.Tensor
    size: int
    max_chunks: int


def _chunk_table(packed: PackedTargets) -> _ChunkTable:
    table = packed.cache.get("chunk_table")
    if table is None:
        counts = [triton.cdiv(n, CHUNK) for n in packed.numels]
        layer_of = [layer for layer, k in enumerate(counts) for _ in range(k)]
        start_of = [i * CHUNK for k in counts for i in range(k)]
        firsts = [0, *itertools.accumulate(counts)][:-1]

        def dev(values: list[int], dtype: torch.dtype = torch.int64) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=packed.device)

        table = _ChunkTable(
            t_offsets=dev(list(packed.offsets)),
            numels=dev(list(packed.numels)),
            chunk_layer=dev(layer_of, torch.int32),
            chunk_start=dev(start_of),
            first_chunk=dev(firsts),
            num_chunks=dev(counts),
            size=len(layer_of),
            max_chunks=max(counts),
        )
        packed.cache["chunk_table"] = table
    return table


def _candidate_table(packed: PackedTargets, cands: Sequence[torch.Tensor], rows: int) -> torch.Tensor:
    """(2, L) int64 on the device: data pointers and 16-byte row alignment flags, cached."""
    cache: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = packed.cache.setdefault("pointers", {})
    pointers = tuple(c.data_ptr() for c in cands)
    key = (cands[0].dtype, rows, pointers)
    hit = cache.get(key)
    if hit is not None:
        return hit[0]
    size = cands[0].element_size()
    aligned = [
        int(p % 16 == 0 and (rows == 1 or n * size % 16 == 0))
        for p, n in zip(pointers, packed.numels, strict=True)
    ]
    host = torch.tensor([list(pointers), aligned], dtype=torch.int64)
    if packed.device.type == "cuda":
        # Pinned and kept alive with the device copy: the copy never blocks the host, and a CUDA
        # graph that captured it replays from a buffer that still holds the same pointers.
        host = host.pin_memory()
        table = host.to(packed.device, non_blocking=True)
    else:
        table = host
    capturing = packed.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if len(cache) >= _POINTER_CACHE_SIZE and not capturing:
        cache.pop(next(iter(cache)))
    cache[key] = (table, host)
    return table


def _constants(packed: PackedTargets, eps: float, dtype: torch.dtype) -> torch.Tensor:
    cache: dict[tuple[float, torch.dtype], torch.Tensor] = packed.cache.setdefault("constants", {})
    key = (eps, dtype)
    if key not in cache:
        cache[key] = torch.tensor([eps, TINY], dtype=dtype, device=packed.device)
    return cache[key]


def _launch_forward(
    packed: PackedTargets,
    cost: Cost,
    eps: float,
    weights: torch.Tensor,
    cands: Sequence[torch.Tensor],
    rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    table = _chunk_table(packed)
    acc = accumulation_dtype(cands[0].dtype)
    layers = packed.num_layers
    device = packed.device
    cand_table = _candidate_table(packed, cands, rows)
    partials = torch.empty((3, rows, table.size), dtype=acc, device=device)
    _stats_kernel[(rows * table.size,)](
        cand_table, packed.flat, table.t_offsets, table.numels, table.chunk_layer, table.chunk_start,
        partials, rows, table.size, layers,
        CAND_DTYPE=TL_DTYPES[cands[0].dtype], ACC=TL_DTYPES[acc], CHUNK=CHUNK, BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )  # fmt: skip
    loss = torch.empty(rows, dtype=acc, device=device)
    coef = torch.empty((2, rows, layers), dtype=acc, device=device)
    # a (layers x chunks) tile of partial sums per step, about 4096 values
    block_l = max(16, triton.next_power_of_2(layers))
    block_k = max(16, min(triton.next_power_of_2(table.max_chunks), 4096 // block_l))
    _finalize_kernel[(rows,)](
        partials, table.first_chunk, table.num_chunks, packed.sq_norms, weights, loss, coef,
        rows, table.size, layers, table.max_chunks, _constants(packed, eps, acc),
        COST=_COST_CODE[cost], ACC=TL_DTYPES[acc], BLOCK_L=block_l, BLOCK_K=block_k, num_warps=NUM_WARPS,
    )  # fmt: skip
    return loss, coef


def _launch_backward(
    packed: PackedTargets,
    cands: Sequence[torch.Tensor],
    coef: torch.Tensor,
    grad_loss: torch.Tensor,
    rows: int,
) -> list[torch.Tensor]:
    table = _chunk_table(packed)
    dtype = cands[0].dtype
    cand_table = _candidate_table(packed, cands, rows)
    out = torch.empty(rows * packed.flat.numel(), dtype=dtype, device=packed.device)
    grad_loss = grad_loss.reshape(-1)
    _backward_kernel[(rows * table.size,)](
        cand_table, packed.flat, table.t_offsets, table.numels, table.chunk_layer, table.chunk_start,
        coef, grad_loss, grad_loss.stride(0), out, rows, packed.num_layers,
        CAND_DTYPE=TL_DTYPES[dtype], ACC=TL_DTYPES[accumulation_dtype(dtype)], CHUNK=CHUNK, BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )  # fmt: skip
    return [
        out.narrow(0, rows * off, rows * n).view(c.shape)
        for off, n, c in zip(packed.offsets, packed.numels, cands, strict=True)
    ]


@dataclass(frozen=True, eq=False)
class _Call:
    """Everything about one matching call that is not a tensor autograd must see."""

    packed: PackedTargets
    cost: Cost
    eps: float
    batched: bool  # candidate tensors carry a leading restart dimension


NOT_TWICE_DIFFERENTIABLE = (
    "gradleak's fused kernels are differentiable once: differentiate their backward with the "
    "reference backend (backend='reference') instead"
)


def to_front(t: torch.Tensor, dim: int | None, size: int) -> torch.Tensor:
    return t.movedim(dim, 0) if dim is not None else t.expand(size, *t.shape)


class _GradientMatching(torch.autograd.Function):
    """loss(candidate) for a packed target; outputs (loss, coef), coef is non-differentiable."""

    @staticmethod
    def forward(
        call: _Call, weights: torch.Tensor, *cands: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = cands[0].shape[0] if call.batched else 1
        loss, coef = _launch_forward(call.packed, call.cost, call.eps, weights, _contiguous(cands), rows)
        return (loss if call.batched else loss.reshape(())), coef

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
        call, _weights, *cands = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1], *cands)
        ctx.call = call

    @staticmethod
    def backward(
        ctx: Any, grad_loss: torch.Tensor, _grad_coef: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        coef, *cands = ctx.saved_tensors
        # Through a second Function so that torch.func transforms hand the kernel plain tensors.
        grads = _GradientMatchingBackward.apply(ctx.call, coef, grad_loss, *cands)
        return (None, None, *grads)

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple[int | None, ...], call: _Call, weights: torch.Tensor, *cands: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[int, int]]:
        if in_dims[1] is not None:
            raise KernelInputError("layer weights must be the same for every vmapped restart")
        size = info.batch_size
        moved = [to_front(c, dim, size) for c, dim in zip(cands, in_dims[2:], strict=True)]
        rows = moved[0].shape[1] if call.batched else 1
        if call.batched:
            moved = [c.reshape(size * rows, *c.shape[2:]) for c in moved]
        loss, coef = _GradientMatching.apply(replace(call, batched=True), weights, *moved)
        return (loss.view(size, rows) if call.batched else loss, coef.view(2, size, rows, -1)), (0, 1)


class _GradientMatchingBackward(torch.autograd.Function):
    """dLoss/dcandidate from the forward's coefficients; itself not differentiable."""

    @staticmethod
    def forward(
        call: _Call, coef: torch.Tensor, grad_loss: torch.Tensor, *cands: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        rows = cands[0].shape[0] if call.batched else 1
        return tuple(_launch_backward(call.packed, _contiguous(cands), coef, grad_loss, rows))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        raise RuntimeError(NOT_TWICE_DIFFERENTIABLE)

    @staticmethod
    def vmap(
        info: Any,
        in_dims: tuple[int | None, ...],
        call: _Call,
        coef: torch.Tensor,
        grad_loss: torch.Tensor,
        *cands: torch.Tensor,
    ) -> tuple[tuple[torch.Tensor, ...], tuple[int, ...]]:
        size = info.batch_size
        coef = to_front(coef, in_dims[1], size)  # (size, 2, rows, L)
        rows = coef.shape[2]
        coef = coef.movedim(0, 1).reshape(2, size * rows, -1)
        grad_loss = to_front(grad_loss, in_dims[2], size).reshape(size * rows)
        moved = [to_front(c, dim, size) for c, dim in zip(cands, in_dims[3:], strict=True)]
        if call.batched:
            moved = [c.reshape(size * rows, *c.shape[2:]) for c in moved]
        grads = _GradientMatchingBackward.apply(replace(call, batched=True), coef, grad_loss, *moved)
        if call.batched:
            grads = tuple(g.view(size, rows, *g.shape[1:]) for g in grads)
        return grads, (0,) * len(grads)


def _contiguous(cands: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [c if c.is_contiguous() else c.contiguous() for c in cands]


def gradient_matching(
    packed: PackedTargets,
    cands: Sequence[torch.Tensor],
    *,
    cost: Cost,
    weights: torch.Tensor,
    eps: float,
    batched: bool,
) -> torch.Tensor:
    """The fused loss: a scalar, or one per restart when `batched` (cands are (R, *shape_l)).

    Arguments are assumed validated by `kernels.gradient_matching_loss`.
    """
    loss, _ = _GradientMatching.apply(_Call(packed, cost, eps, batched), weights, *cands)
    return loss
