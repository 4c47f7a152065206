"""benchmarks/sass.py: SASS parsing, loop weighting and trip counts, on canned nvdisasm listings
whose expected counts are worked out by hand below (no toolchain needed)."""

import re
import textwrap

import pytest

from benchmarks import sass

SOURCE = textwrap.dedent(
    """\
    import triton
    @triton.jit
    def kern(x_ptr, D, K, BLOCK_D: tl.constexpr):
        kk = K
        for d0 in range(0, D, BLOCK_D):
            for k in range(K):
                acc += 1
        helper(x_ptr, kk)

    @triton.jit
    def helper(p, n):
        for i in range(n * 2):
            pass
    """
)

# Lines of SOURCE: 3 def kern, 4 a local bound to an argument, 5 the D loop, 6 the K loop, 7 its
# body, 8 the call of helper (with the local), 12 helper's loop. nvdisasm -c -gi layout: a location comment applies to the instructions after it.
LISTING = """\
kern:
.text.kern:
\t//## File "{src}", line 3
        /*0000*/                   LDC R1, c[0x0][0x28] ;
\t//## File "{src}", line 5
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
.L_x_0:
        /*0020*/                   IADD3 R0, R0, 0x1, RZ ;
        /*0030*/                   LDGSTS.E.BYPASS.LTC128B.128 [R3], desc[UR4][R8.64] ;
.L_x_1:
\t//## File "{src}", line 7
        /*0040*/                   FADD R5, R5, 1 ;
        /*0050*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
\t//## File "{src}", line 6
        /*0060*/               @P0 BRA `(.L_x_1) ;
\t//## File "{src}", line 5
        /*0070*/              @!P1 BRA `(.L_x_0) ;
\t//## File "{src}", line 12 inlined at "{src}", line 8
.L_x_2:
        /*0080*/                   IADD3 R6, R6, 0x1, RZ ;
        /*0090*/               @P2 BRA `(.L_x_2) ;
\t//## File "{src}", line 3
        /*00a0*/                   STG.E.U16 desc[UR4][R2.64], R5 ;
        /*00b0*/                   EXIT ;
.L_x_3:
        /*00c0*/                   BRA `(.L_x_3);
        /*00d0*/                   NOP;
        /*00e0*/                   FADD R1, R1, R1 ;
        /*00f0*/                   RET.REL.NODEC R20 `(kern) ;
"""


@pytest.fixture
def listing(tmp_path):
    src = tmp_path / "kern.py"
    src.write_text(SOURCE)
    return LISTING.format(src=src)


def test_parse(listing):
    instrs, labels = sass.parse(listing)
    assert [i.addr for i in instrs] == list(range(0, 0x100, 0x10))
    assert labels[".L_x_0"] == 0x20 and labels[".L_x_1"] == 0x40 and labels[".L_x_2"] == 0x80
    bra = instrs[6]
    assert bra.opcode == "BRA" and bra.target == ".L_x_1" and bra.predicated
    assert instrs[8].loc[0][1] == 12 and instrs[8].loc[1][1] == 8  # inlined helper, then its call site
    assert instrs[1].opcode == "LDG.E.128" and not instrs[1].predicated


def test_access_bits():
    assert sass.access_bits("LDG.E.128") == 128
    assert sass.access_bits("LDG.E.64.CONSTANT") == 64
    assert sass.access_bits("LDG.E.U16") == 16
    assert sass.access_bits("STG.E.U8") == 8
    assert sass.access_bits("LDG.E") == 32
    assert sass.access_bits("LDG.E.EF") == 32


def test_loops_weighted_by_trip_counts(listing):
    # D loop: 768 / 256 = 3 trips; K loop: 5 per D trip; helper's loop: range(n * 2) with n = kk = K: 10.
    a = sass.analyse(listing, sass.SourceLoops("kern", dict(D=768, K=5, BLOCK_D=256)))
    assert a.unresolved == []
    assert sorted((lp.start, lp.end, lp.trips) for lp in a.loops) == [
        (0x20, 0x70, 3),
        (0x40, 0x60, 5),
        (0x80, 0x90, 10),
    ]
    assert a.static == 13 and a.subroutine == 3  # 0x00..0xc0 (the trap loop included); NOP, FADD, RET after
    # outside loops 0x00 0x10 0xa0 0xb0 0xc0: 5; D loop only 0x20 0x30 0x70: 3 x 3;
    # K loop 0x40 0x50 0x60: 3 x 3 x 5; helper 0x80 0x90: 2 x 10
    assert a.dynamic == 5 + 9 + 45 + 20
    assert a.barriers == 15
    assert a.loads == {128: 1 + 3} and a.widest_load == 128
    assert a.stores == {16: 1} and a.widest_store == 16
    assert a.async_copies == ["LDGSTS"]


def test_helper_loop_with_the_call_line_only(listing):
    """Triton can give the instructions it inlines from a helper the call's line alone: the loop
    is then the helper's one loop, bound at that call."""
    bare = re.sub(r'line 12 inlined at "[^"]+", line 8', "line 8", listing)
    instrs, _ = sass.parse(bare)
    assert [i.loc for i in instrs if i.addr == 0x80][0][0][1] == 8
    a = sass.analyse(bare, sass.SourceLoops("kern", dict(D=768, K=5, BLOCK_D=256)))
    assert a.unresolved == [] and sorted(lp.trips for lp in a.loops) == [3, 5, 10]


def test_unresolved_loops_count_once(listing):
    a = sass.analyse(listing, sass.SourceLoops("kern", dict(D=768, BLOCK_D=256)))  # K unknown
    assert [u.rsplit(":", 1)[1] for u in a.unresolved] == ["6 (K unknown)", "12 (n unknown)"]
    assert a.dynamic == 5 + 9 + 9 + 2
    assert sass.analyse(listing).dynamic == 13  # no trip counts at all: the static count


def test_unrolled_loop_and_remainder(tmp_path):
    """ptxas's split of one source loop: an unrolled loop (4 copies of a 2-instruction body plus
    the branch) and a remainder loop (1 copy plus the branch); 10 trips = 2 x 4 unrolled + 2."""
    src = tmp_path / "kern.py"
    src.write_text(SOURCE)
    body = "".join(f"        /*{a:04x}*/                   FADD R5, R5, 1 ;\n" for a in range(0x10, 0x90, 0x10))
    listing = (
        f'kern:\n\t//## File "{src}", line 6\n        /*0000*/                   MOV R0, RZ ;\n.L_x_0:\n{body}'
        "        /*0090*/               @P0 BRA `(.L_x_0) ;\n.L_x_1:\n"
        "        /*00a0*/                   FADD R5, R5, 1 ;\n        /*00b0*/                   FADD R5, R5, 1 ;\n"
        "        /*00c0*/               @P1 BRA `(.L_x_1) ;\n        /*00d0*/                   EXIT ;\n"
        ".L_x_2:\n        /*00e0*/                   BRA `(.L_x_2);\n"
    )
    a = sass.analyse(listing, sass.SourceLoops("kern", dict(K=10)))
    trips = sorted((lp.body, lp.trips) for lp in a.loops)
    assert trips == [(3, 2), (9, 2)]
    assert a.dynamic == 1 + 9 * 2 + 3 * 2 + 2  # MOV, the loops, EXIT and the trap


TINY = textwrap.dedent(
    """\
    import triton
    import triton.language as tl


    @triton.jit
    def tiny(x_ptr, out_ptr, D, BLOCK: tl.constexpr):
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for d0 in range(0, D, BLOCK):
            offs = d0 + tl.arange(0, BLOCK)
            acc += tl.load(x_ptr + offs, mask=offs < D, other=0.0)
        tl.store(out_ptr + tl.arange(0, BLOCK), acc)
    """
)

SCRIPT = textwrap.dedent(
    """\
    import json, sys
    import torch
    sys.path.insert(0, sys.argv[1])
    try:
        from benchmarks.kernel_resources import disassemble, stand_in_driver
        stand_in_driver()
    except Exception as e:  # Triton's internals moved
        print("SKIP", repr(e)); sys.exit(0)
    from benchmarks import sass
    import tiny_kernel
    counts = {}
    for D in (1008, 4000):  # both multiples of 16: one specialisation, one cubin
        k = tiny_kernel.tiny.warmup(torch.empty(D), torch.empty(128), D, BLOCK=128, grid=(1,))
        a = sass.analyse(disassemble(k.asm["cubin"]), sass.SourceLoops("tiny", dict(D=D, BLOCK=128)))
        counts[D] = dict(static=a.static, dynamic=a.dynamic, unresolved=a.unresolved,
                         trips=[lp.trips for lp in a.loops], loads=a.loads)
    print(json.dumps(counts))
    """
)


def test_trip_counts_of_a_compiled_kernel(tmp_path):
    """A real kernel through Triton's sm_90 pipeline and nvdisasm: its runtime loop is found from
    the line information and weighted by cdiv(D, BLOCK) (8 trips at D = 1008, 32 at D = 4000), so
    the count grows with D by whole loop bodies."""
    import json
    import os
    import subprocess
    import sys

    (tmp_path / "tiny_kernel.py").write_text(TINY)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DEFAULT_FP_FUSION="1", TRITON_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, repo], env=env, cwd=repo, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    if proc.stdout.startswith("SKIP"):
        pytest.skip(f"cannot drive Triton's compiler without a GPU here: {proc.stdout.strip()}")
    counts = {int(d): c for d, c in json.loads(proc.stdout.splitlines()[-1]).items()}
    small, large = counts[1008], counts[4000]
    assert small["unresolved"] == [] and large["unresolved"] == []
    assert small["trips"] and all(t is not None for t in small["trips"])
    assert small["static"] == large["static"]  # the same code: D is a runtime argument
    assert large["dynamic"] > small["dynamic"] > small["static"]
    # the loop loads once per trip: 4x the trips, well over twice the loads (a pipelined loop's
    # peeled prologue loads do not grow)
    assert sum(large["loads"].values()) > 2 * sum(small["loads"].values())


def test_persistent_loop_counts_the_busiest_program(tmp_path):
    """range(pid, n, num_programs) over a grid of P programs: the busiest program runs ceil(n / P)
    trips; without the grid size the loop is unresolved (counted once)."""
    src = tmp_path / "persistent.py"
    src.write_text(
        "@triton.jit\ndef kern(n_blocks):\n    pid = tl.program_id(0)\n    num_programs = tl.num_programs(0)\n"
        "    for block in range(pid, n_blocks, num_programs):\n        acc += 1\n"
    )
    listing = (
        f'kern:\n\t//## File "{src}", line 5\n.L_x_0:\n        /*0000*/                   FADD R5, R5, 1 ;\n'
        "        /*0010*/               @P0 BRA `(.L_x_0) ;\n        /*0020*/                   EXIT ;\n"
    )
    a = sass.analyse(listing, sass.SourceLoops("kern", dict(n_blocks=100), programs=8))
    assert a.unresolved == [] and [lp.trips for lp in a.loops] == [13]
    assert a.dynamic == 2 * 13 + 1
    unknown = sass.analyse(listing, sass.SourceLoops("kern", dict(n_blocks=100)))
    assert len(unknown.unresolved) == 1 and unknown.dynamic == 3
