"""Compile every gradleak kernel for an H100 (sm_90) without a GPU and print, as JSON, the count
of global memory instructions by kind in each kernel's PTX.

Run by test_kernels_compile.py in a fresh interpreter without TRITON_INTERPRET: once triton is
imported in interpreter mode, its own library functions (tl.sum, ...) are interpreted objects and
nothing can be compiled in that process any more.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise SystemExit("compile_probe.py must run without TRITON_INTERPRET")

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels import gradmatch, tv


def ptx_memory_ops(
    kernel: Any, signature: dict[str, str], constexprs: dict[str, Any], num_warps: int
) -> dict[str, int]:
    full = {name: signature.get(name, "constexpr") for name in kernel.arg_names}
    pointers = [name for name, ty in full.items() if ty.startswith("*")]
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in pointers}
    source = ASTSource(fn=kernel, signature=full, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    ops: collections.Counter[str] = collections.Counter()
    for line in compiled.asm["ptx"].splitlines():
        words = line.split()
        if words and words[0].startswith("@"):
            words = words[1:]
        if words and words[0].startswith(("ld.global", "st.global")):
            ops[words[0]] += 1
    return dict(ops)


def main() -> None:
    tables = {
        "cand_table": "*i64",
        "t_offsets": "*i64",
        "numels": "*i64",
        "chunk_layer": "*i32",
        "chunk_start": "*i64",
    }
    results: dict[str, dict[str, int]] = {}
    for name, dtype, ptr in (("fp32", tl.float32, "*fp32"), ("bf16", tl.bfloat16, "*bf16")):
        blocks = {"CAND_DTYPE": dtype, "ACC": tl.float32, "CHUNK": gradmatch.CHUNK, "BLOCK": gradmatch.BLOCK}
        results[f"stats-{name}"] = ptx_memory_ops(
            gradmatch._stats_kernel,
            {**tables, "target": "*fp32", "partials": "*fp32", "R": "i32", "C": "i32", "L": "i32"},
            blocks,
            gradmatch.NUM_WARPS,
        )
        results[f"backward-{name}"] = ptx_memory_ops(
            gradmatch._backward_kernel,
            {**tables, "target": "*fp32", "coef": "*fp32", "grad_loss": "*fp32", "grad_stride": "i32"}
            | {"out": ptr, "R": "i32", "L": "i32"},
            blocks,
            gradmatch.NUM_WARPS,
        )
    # every cost in fp32; float64 (gradchecks) once, with the cost that runs the most code
    finalizers = [("fp32", tl.float32, "*fp32", cost) for cost in (0, 1, 2)] + [
        ("fp64", tl.float64, "*fp64", 2)
    ]
    for name, acc, ptr, cost in finalizers:
        tensors = ("partials", "sq_norms", "weights", "loss", "coef", "constants")
        signature = {name: ptr for name in tensors} | {"first_chunk": "*i64", "num_chunks": "*i64"}
        signature |= {"R": "i32", "C": "i32", "L": "i32", "max_chunks": "i32"}
        results[f"finalize-{name}-{cost}"] = ptx_memory_ops(
            gradmatch._finalize_kernel,
            signature,
            {"COST": cost, "ACC": acc, "BLOCK_L": 64, "BLOCK_K": 64},
            gradmatch.NUM_WARPS,
        )
    shape = {"H": "i32", "W": "i32", "row_blocks": "i32", "count_x": "i32", "count_y": "i32"}
    blocks = {"ACC": tl.float32, "BLOCK_H": 64, "BLOCK_W": 32}
    results["tv-forward"] = ptx_memory_ops(
        tv._tv_forward_kernel, {"x": "*bf16", "partials": "*fp32", **shape}, blocks, 4
    )
    results["tv-backward"] = ptx_memory_ops(
        tv._tv_backward_kernel,
        {
            "x": "*fp32",
            "grad_x": "*fp32",
            "grad_out": "*fp32",
            "grad_stride": "i32",
            "planes_per_group": "i32",
        }
        | shape,
        blocks,
        4,
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
