"""Reading SASS without a GPU: what one warp of a kernel executes, from nvdisasm's listing.

``parse`` reads ``nvdisasm -c -gi`` output (instructions with their addresses, predicates, branch
targets and source lines, inlined call sites included). ``analyse`` finds the loops (backward
branches), weights every instruction by the trip counts of the loops around it and counts what
matters for speed: warp-instructions, barriers, the widest global load and store, asynchronous
copies (LDGSTS = cp.async, UTMALDG / UBLKCP = TMA). Trip counts come from a callback; a loop whose
count it cannot give is counted once and named in ``unresolved``.

``SourceLoops`` is such a callback for Triton kernels: the loop's backward branch carries the
source line of its ``for`` statement, whose ``range(...)`` it evaluates with the launch's
arguments (through inlined ``@triton.jit`` helpers via their call sites). Estimates, not
measurements: both sides of a branch are counted, a pipelined loop's peeled iterations are
counted as loop iterations, and when ptxas splits one source loop into an unrolled loop and a
remainder loop, the unroll factor is taken as the ratio of their body lengths (branch excluded).
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass, field
from typing import Callable

_LOC = re.compile(r'"([^"]+)", line (\d+)')
_INSTR = re.compile(r"/\*([0-9a-fA-F]+)\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_LABEL = re.compile(r"^\s*([.\w$]+):\s*$")
_TARGET = re.compile(r"`\(([^)]+)\)")

ASYNC_COPIES = ("LDGSTS", "UTMALDG", "UBLKCP")


@dataclass
class Instr:
    addr: int
    opcode: str  # with modifiers, e.g. LDG.E.128
    operands: str
    predicated: bool
    loc: tuple[tuple[str, int], ...]  # (file, line), innermost first, then the inlined call sites
    target: str | None = None  # branch target label


@dataclass
class Loop:
    start: int  # address of the first instruction (the branch target)
    end: int  # address of the backward branch
    loc: tuple[tuple[str, int], ...]
    body: int = 0  # instructions inside, nested loops included once
    trips: int | None = None
    note: str = ""
    own: list = field(default_factory=list)  # locations of its instructions outside nested loops


@dataclass
class Analysis:
    static: int  # instructions of the main code path (subroutines after the end excluded)
    dynamic: float  # instructions one warp executes, loops weighted by their trip counts
    barriers: float  # BAR.* executed by one warp
    loops: list[Loop]
    unresolved: list[str]  # loops counted once (no trip count)
    loads: dict[int, float] = field(default_factory=dict)  # global load width (bits) -> executed count
    stores: dict[int, float] = field(default_factory=dict)
    async_copies: list[str] = field(default_factory=list)
    subroutine: int = 0  # instructions after the main code (slow paths reached by CALL), not counted

    @property
    def widest_load(self) -> int:
        return max(self.loads, default=0)

    @property
    def widest_store(self) -> int:
        return max(self.stores, default=0)


def parse(text: str) -> tuple[list[Instr], dict[str, int]]:
    """Instructions and labels (name -> address of the next instruction) of one function's listing."""
    instrs: list[Instr] = []
    labels: dict[str, int] = {}
    pending: list[str] = []
    loc: tuple[tuple[str, int], ...] = ()
    for line in text.splitlines():
        if "//##" in line:
            loc = tuple((f, int(n)) for f, n in _LOC.findall(line))
            continue
        m = _INSTR.search(line)
        if m:
            addr = int(m.group(1), 16)
            for name in pending:
                labels[name] = addr
            pending = []
            target = _TARGET.search(m.group(4))
            instrs.append(
                Instr(addr, m.group(3), m.group(4).strip(), bool(m.group(2)), loc, target.group(1) if target else None)
            )
            continue
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
    return instrs, labels


def access_bits(opcode: str) -> int:
    """Width in bits of a global load/store opcode (LDG.E.128 -> 128, LDG.E.U16 -> 16, LDG.E -> 32)."""
    parts = opcode.split(".")[1:]
    for p in parts:
        if p in ("128", "64"):
            return int(p)
    for p in parts:
        if p in ("U16", "S16"):
            return 16
        if p in ("U8", "S8"):
            return 8
    return 32


def _main_end(instrs: list[Instr], labels: dict[str, int]) -> int:
    """Index past the main code: the trap loop (BRA to itself) that ptxas places after the last EXIT."""
    for i, ins in enumerate(instrs):
        if ins.opcode == "BRA" and ins.target is not None and labels.get(ins.target) == ins.addr:
            return i + 1
    return len(instrs)


def analyse(text: str, trips: Callable[[Loop, list[Loop]], tuple[int | None, str]] | None = None) -> Analysis:
    """Counts per warp of one function's SASS (see the module docstring). ``trips(loop, loops)``
    returns (trip count or None, note); without it every loop counts once."""
    instrs, labels = parse(text)
    end = _main_end(instrs, labels)
    main = instrs[:end]
    loops = []
    for ins in main:
        if ins.opcode.startswith("BRA") and ins.target in labels:
            start = labels[ins.target]
            if start < ins.addr:
                loops.append(Loop(start, ins.addr, ins.loc))
    for lp in loops:
        inside = [ins for ins in main if lp.start <= ins.addr <= lp.end]
        lp.body = len(inside)
        lp.own = [ins.loc for ins in inside if not any(_nested(o, lp) and o.start <= ins.addr <= o.end for o in loops)]
    unresolved = []
    for lp in loops:
        lp.trips, lp.note = trips(lp, loops) if trips else (None, "no trip counts asked")
        if lp.trips is None:
            where = ":".join(map(str, lp.loc[0])) if lp.loc else "?"
            unresolved.append(f"{where} ({lp.note})")
    dynamic = barriers = 0.0
    loads: dict[int, float] = {}
    stores: dict[int, float] = {}
    async_copies = set()
    for ins in main:
        w = 1.0
        for lp in loops:
            if lp.start <= ins.addr <= lp.end and lp.trips is not None:
                w *= lp.trips
        dynamic += w
        op = ins.opcode
        if op.startswith("BAR."):
            barriers += w
        if op.startswith("LDG.") or op == "LDG" or op.startswith("LDGSTS"):
            bits = access_bits(op)
            loads[bits] = loads.get(bits, 0.0) + w
        elif op.startswith("STG.") or op == "STG":
            bits = access_bits(op)
            stores[bits] = stores.get(bits, 0.0) + w
        base = op.split(".")[0]
        if base in ASYNC_COPIES:
            async_copies.add(base)
    return Analysis(
        static=len(main),
        dynamic=dynamic,
        barriers=barriers,
        loops=loops,
        unresolved=unresolved,
        loads=loads,
        stores=stores,
        async_copies=sorted(async_copies),
        subroutine=len(instrs) - end,
    )


# ------------------------------------------------------------------ trip counts from Triton source
class Unknown(Exception):
    pass


_NOTES = "__notes__"  # key of an environment's notes per name


def _cdiv(a, b):
    return -(-a // b)


_PROGRAM_ID = object()  # tl.program_id(...): known only as a persistent loop's start
_CALLS = {"cdiv": _cdiv, "min": min, "max": max, "minimum": min, "maximum": max}
_BINOPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
}


class SourceLoops:
    """Trip counts of a Triton kernel's loops (a ``trips`` callback for :func:`analyse`).

    ``kernel``: the kernel's function name; ``env``: its arguments by name (ints, floats, tuples;
    tensors left out), as the launch passed them. A subscript by an unknown index (e.g. a
    ``static_range`` variable over per-head tuples) takes the largest element: an upper bound,
    said in the note.
    """

    def __init__(self, kernel: str, env: dict, programs: int | None = None):
        self.kernel = kernel
        self.env = env
        # grid size: a persistent loop ``range(pid, n, num_programs)`` then counts the busiest
        # program's trips, ceil(n / programs), instead of being unknown
        self.programs = programs
        self._trees: dict[str, ast.Module] = {}

    def _tree(self, path: str) -> ast.Module:
        if path not in self._trees:
            with open(path) as f:
                self._trees[path] = ast.parse(f.read())
        return self._trees[path]

    def _function_at(self, path: str, line: int) -> ast.FunctionDef | None:
        best = None
        for node in ast.walk(self._tree(path)):
            if isinstance(node, ast.FunctionDef) and node.lineno <= line <= node.end_lineno:
                if best is None or node.lineno > best.lineno:
                    best = node
        return best

    def _env(self, fn: ast.FunctionDef, sites: tuple[tuple[str, int], ...], notes: list[str]) -> dict:
        """Arguments of ``fn`` by name: the launch's for the kernel, else evaluated at the call site."""
        if fn.name == self.kernel:
            return self.env
        if not sites:
            raise Unknown(f"{fn.name} is not inlined from a known call site")
        path, line = sites[0]
        caller = self._function_at(path, line)
        if caller is None:
            raise Unknown(f"no function around {path}:{line}")
        calls = [
            n
            for n in ast.walk(caller)
            if isinstance(n, ast.Call)
            and n.lineno <= line <= n.end_lineno
            and getattr(n.func, "id", getattr(n.func, "attr", None)) == fn.name
        ]
        if not calls:
            raise Unknown(f"no call of {fn.name} at {path}:{line}")
        outer = self._locals(caller, line, self._env(caller, sites[1:], notes))
        params = [a.arg for a in fn.args.args]
        env: dict = {_NOTES: {}}
        for name, arg in [*zip(params, calls[0].args), *((kw.arg, kw.value) for kw in calls[0].keywords)]:
            self._bind(env, name, arg, outer)
        return env

    def _bind(self, env: dict, name: str, node: ast.AST, outer: dict) -> None:
        """env[name] = the value of ``node`` in ``outer``, with the notes its evaluation made (said
        only when a loop bound uses the name); an unknown value unbinds the name."""
        made: list[str] = []
        try:
            env[name] = self._eval(node, outer, made)
            env[_NOTES] = {**env.get(_NOTES, {}), name: made}
        except Unknown:
            env.pop(name, None)

    def _eval(self, node: ast.AST, env: dict, notes: list[str]):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in env and node.id != _NOTES:
                notes.extend(n for n in env.get(_NOTES, {}).get(node.id, ()) if n not in notes)
                return env[node.id]
            raise Unknown(f"{node.id} unknown")
        if isinstance(node, ast.Subscript):
            seq = self._eval(node.value, env, notes)
            if not isinstance(seq, tuple):
                raise Unknown("subscript of a non-tuple")
            try:
                return seq[self._eval(node.slice, env, notes)]
            except Unknown:
                notes.append(f"max over {ast.unparse(node)}")
                return max(seq)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = self._eval(node.left, env, notes), self._eval(node.right, env, notes)
            if left is _PROGRAM_ID or right is _PROGRAM_ID:
                raise Unknown("arithmetic on the program id")
            return _BINOPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -self._eval(node.operand, env, notes)
        if isinstance(node, ast.Call):
            name = getattr(node.func, "id", getattr(node.func, "attr", None))
            if name == "program_id":
                return _PROGRAM_ID
            if name == "num_programs" and self.programs is not None:
                return self.programs
            if name in _CALLS and not node.keywords:
                return _CALLS[name](*(self._eval(a, env, notes) for a in node.args))
            if name == "to" and isinstance(node.func, ast.Attribute):  # x.to(tl.int64): same value
                return self._eval(node.func.value, env, notes)
        raise Unknown(f"cannot evaluate {ast.unparse(node)}")

    def _fors(self, path: str) -> list[ast.For]:
        return [
            n
            for n in ast.walk(self._tree(path))
            if isinstance(n, ast.For) and _iter_name(n) in ("range", "tl.range", "triton.language.range")
        ]

    def _source(self, loop: Loop) -> tuple[str, ast.For, tuple] | None:
        """The ``for`` statement of a SASS loop and the call sites around it: the statement on the
        backward branch's line, or the one loop of a helper called on that line, else the
        innermost one that holds most of the loop's own instructions (the branch of a rotated loop
        can carry another line)."""
        if loop.loc:
            path, line = loop.loc[0]
            try:
                fors = [f for f in self._fors(path) if f.lineno == line]
            except (OSError, SyntaxError):
                fors = []
            if fors:
                return path, fors[0], loop.loc[1:]
            inlined = self._helper_loop(path, line)
            if inlined is not None:
                return path, inlined, loop.loc
        best, best_key = None, None
        paths = {p for chain in loop.own for p, _ in chain if "/triton/" not in p}
        for path in sorted(paths):
            try:
                fors = self._fors(path)
            except (OSError, SyntaxError):
                continue
            for f in fors:
                sites = None
                covered = 0
                for chain in loop.own:
                    for i, (p, line) in enumerate(chain):
                        if p == path and f.lineno <= line <= f.end_lineno:
                            covered += 1
                            sites = sites if sites is not None else chain[i + 1 :]
                            break
                key = (covered, -(f.end_lineno - f.lineno))
                if covered * 2 >= len(loop.own) and (best_key is None or key > best_key):
                    best, best_key = (path, f, sites), key
        return best

    def _helper_loop(self, path: str, line: int) -> ast.For | None:
        """The one loop of a helper called at ``path:line``: Triton can give every instruction it
        inlines from a ``@triton.jit`` helper the call's line alone."""
        try:
            tree = self._tree(path)
        except (OSError, SyntaxError):
            return None
        helpers = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
        for call in ast.walk(tree):
            name = getattr(getattr(call, "func", None), "id", None)
            if isinstance(call, ast.Call) and call.lineno <= line <= call.end_lineno and name in helpers:
                fors = [f for f in self._fors(path) if helpers[name].lineno <= f.lineno <= helpers[name].end_lineno]
                if len(fors) == 1:
                    return fors[0]
        return None

    def _trips(self, loop: Loop, notes: list[str]) -> int:
        found = self._source(loop)
        if found is None:
            raise Unknown("no for statement found for this loop")
        path, node, sites = found
        fn = self._function_at(path, node.lineno)
        env = self._locals(fn, node.lineno, self._env(fn, sites, notes))
        args = [self._eval(a, env, notes) for a in node.iter.args[:3]]
        start, stop, step = (0, args[0], 1) if len(args) == 1 else (args[0], args[1], args[2] if len(args) > 2 else 1)
        if start is _PROGRAM_ID:
            if step != self.programs:
                raise Unknown("a loop from the program id with a step other than the grid")
            notes.append(f"persistent loop: the busiest of {self.programs} programs")
            return max(0, _cdiv(stop, step))
        if _PROGRAM_ID in (stop, step):
            raise Unknown("a loop bound is the program id")
        return max(0, _cdiv(stop - start, step))

    def _locals(self, fn: ast.FunctionDef, line: int, env: dict) -> dict:
        """``env`` plus the function's simple assignments (name = expression) before ``line``."""
        env = dict(env)
        assigns = [
            n
            for n in ast.walk(fn)
            if isinstance(n, ast.Assign)
            and len(n.targets) == 1
            and isinstance(n.targets[0], ast.Name)
            and n.lineno < line
        ]
        for a in sorted(assigns, key=lambda n: n.lineno):
            self._bind(env, a.targets[0].id, a.value, env)
        return env

    def __call__(self, loop: Loop, loops: list[Loop]) -> tuple[int | None, str]:
        notes: list[str] = []
        try:
            n = self._trips(loop, notes)
        except Unknown as e:
            return None, str(e)
        # One for statement, several SASS loops that are not nested: copies made by an enclosing
        # static_range (bodies alike: each runs n times), or ptxas's unrolled loop and its
        # remainder (a body u times the shortest one's, branch excluded: n // u and n % u).
        me = self._source(loop)
        twins = [
            o
            for o in loops
            if not _nested(o, loop) and not _nested(loop, o) and (s := self._source(o)) and s[:2] == me[:2]
        ]
        if len(twins) > 1:
            shortest = min(o.body for o in twins)
            unroll = {id(o): max(1, round((o.body - 1) / max(shortest - 1, 1))) for o in twins}
            widest = max(unroll.values())
            if widest > 1:
                notes.append(f"ptxas unrolled by about {widest} (remainder loop)")
                n = n // unroll[id(loop)] if unroll[id(loop)] > 1 else n % widest
        return n, "; ".join(notes)


def _iter_name(node: ast.For) -> str | None:
    func = getattr(node.iter, "func", None)
    return ast.unparse(func) if func is not None else None


def _nested(inner: Loop, outer: Loop) -> bool:
    return inner is not outer and outer.start <= inner.start and inner.end <= outer.end


def occupancy(registers: int, shared: int, num_warps: int) -> tuple[int, str]:
    """Programs (CTAs) per SM on sm_90 and what limits them: 64K registers (allocated per warp in
    units of 256, per quarter SM), 228 KB shared memory (1 KB reserved per CTA), 64 warps, 32 CTAs."""
    per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_regs = (16384 // per_warp) * 4 // num_warps
    by_smem = (233472 // (shared + 1024)) if shared else 32
    by_warps = 64 // num_warps
    limits = {"registers": by_regs, "shared memory": by_smem, "warps": by_warps, "CTAs": 32}
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter
