"""Registers and load order of the rows attention kernel, compiled for sm_90a without a GPU (Triton's own ptxas
and cuobjdump): one padded head-dim tile of 128 against two tiles 64 + 16, head dim 80, 64 keys a program.

    python docs/benchmarks/neox_two_tiles/ptxas_rows.py > docs/benchmarks/neox_two_tiles/ptxas_rows.log

Per form: ptxas's register count, and the SASS sequence of global loads (LDG), the softmax's exponentials
(MUFU.EX2) and stores (STG), run-length encoded: the loads before the first exponential are in flight together.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from streamkv.backends import triton_kernels as tk  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def build(const, num_warps):
    kernel = tk._attn_rows_kernel
    types = {n: "*fp16" for n in ("q_ptr", "k_ptr", "v_ptr")}
    types.update({n: "*fp32" for n in ("cos_ptr", "sin_ptr", "m_ptr", "l_ptr", "acc_ptr")})
    types.update({"valid_ptr": "*i1", "stride_kh": "i32", "scale": "fp32"})
    const = {**{q.name: q.default for q in kernel.params if q.is_constexpr and q.has_default}, **const}
    sig = {n: ("constexpr" if n in const else types[n]) for n in kernel.arg_names}
    # pointers and the head stride 16-aligned, as Triton specializes them at launch (vector loads)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
             if n not in const and (types[n].startswith("*") or n == "stride_kh")}
    src = ASTSource(fn=kernel, signature=sig, constexprs={(kernel.arg_names.index(k),): v for k, v in const.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "launch_pdl": True})


def report(name, compiled):
    with tempfile.TemporaryDirectory() as d:
        ptx, cubin = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        Path(ptx).write_text(compiled.asm["ptx"])
        r = subprocess.run([str(BIN / "ptxas"), "-v", "-arch=sm_90a", ptx, "-o", cubin], capture_output=True,
                           text=True, check=True)
        sass = subprocess.run([str(BIN / "cuobjdump"), "-sass", cubin], capture_output=True, text=True).stdout
    used = [line.split(":", 1)[1].strip() for line in r.stderr.splitlines() if "Used" in line]
    seq = []
    for line in sass.splitlines():
        op = next((o for o in ("LDG", "STG", "MUFU.EX2") if o in line), None)
        if op:
            if seq and seq[-1][0] == op:
                seq[-1][1] += 1
            else:
                seq.append([op, 1])
    print(f"{name}: {'; '.join(used)}")
    print("    " + " ".join(f"{o}x{n}" for o, n in seq))


common = dict(C=2084, SPLIT_LEN=64, G=1, D=80, ROT=20, BLOCK_N=64, NS=33, ROTATE_K=False, PDL=True)
print(f"triton {triton.__version__}, sm_90a, _attn_rows_kernel, head dim 80, 64 keys a program, PDL")
for warps in (1, 2):
    report(f"one tile of 128, {warps} warp(s)", build({**common, "DP": 128}, warps))
    report(f"two tiles 64 + 16, {warps} warp(s)", build({**common, "DP": 64, "DB": 16}, warps))
