"""infer_indices: assign every axis of the forward program a vector space and a variance.

Data axes are upper (vectors) and the sample axis is a batch index. Each op relates the
axes of its output to those of its inputs: elementwise ops and broadcasting keep space and
variance; a contraction pairs an upper with a lower index of one space. A union-find with
parity solves these relations; parameters thereby get mixed variance (``W^o_i``). Where
the model contracts two vectors (``q . k``), the contraction uses the Euclidean metric,
which the rebuilt einsum records explicitly.
"""
from __future__ import annotations

from hogc.errors import SampleMixingError
from hogc.ir import SAMPLE, UNIT, Einsum, Index, Node, Op, Program, Variance, build as B
from hogc.ir.nondiff import NONDIFF_FUNCTIONS
from hogc.ir.printer import format_node

__all__ = ["infer_indices", "one_sample"]

_UP, _BATCH = ("anchor", "up"), ("anchor", "batch")


class _ParityUF:
    def __init__(self):
        self.parent: dict = {}
        self.parity: dict = {}

    def find(self, a):
        if a not in self.parent:
            self.parent[a], self.parity[a] = a, 0
            return a, 0
        path = []
        while self.parent[a] != a:
            path.append(a)
            a = self.parent[a]
        root = a
        # path compression with parities
        acc = 0
        for node in reversed(path):
            acc ^= self.parity[node]
            self.parity[node] = acc
            self.parent[node] = root
        return root, (self.parity[path[0]] if path else 0)

    def union(self, a, b, parity: int) -> bool:
        """Relate a and b (parity 0: same variance, 1: opposite). False on contradiction."""
        ra, pa = self.find(a)
        rb, pb = self.find(b)
        if ra == rb:
            return (pa ^ pb) == parity
        self.parent[rb] = ra
        self.parity[rb] = pa ^ pb ^ parity
        return True


class _UF:
    def __init__(self):
        self.parent: dict = {}

    def find(self, a):
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a, b):
        self.parent[self.find(b)] = self.find(a)


def _unit_pairs(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[int, int]]:
    """Size-1 axes of a reshape, paired in order among those at the same position (equal size
    product before them)."""
    def slots(shape):
        out: dict[int, list[int]] = {}
        p = 1
        for k, d in enumerate(shape):
            if d == 1:
                out.setdefault(p, []).append(k)
            p *= d
        return out
    a, b = slots(src), slots(dst)
    return [pair for p in a.keys() & b.keys() for pair in zip(a[p], b[p])]


def infer_indices(program: Program, per_sample: bool = True, coupled: bool = False) -> Program:
    """Rebuild the forward program with resolved spaces and variances.

    Args:
        program: the captured forward program (provisional indices).
        per_sample: derivative programs will follow samples (every derivative quantity does);
            then an op that couples samples raises :class:`SampleMixingError`.
        coupled: the model couples its samples (train-mode BatchNorm): the data's sample axis is
            an ordinary vector axis, and :func:`one_sample` then makes the batch one sample.
    """
    var, space = _ParityUF(), _UF()

    def same(a, b, same_space=True):
        if same_space:
            space.union(a, b)
        var.union(a, b, 0)

    for node in program.nodes:
        u = node.uid
        out = [(u, k) for k in range(node.ndim)]
        if node.op is Op.INPUT and node.arg[0] == "data":
            for k, ix in enumerate(node.indices):
                sample = ix.space == SAMPLE and not coupled
                var.union(_BATCH if sample else _UP, (u, k), 0)
                if sample:
                    space.union(("space", SAMPLE), (u, k))
        elif node.op is Op.ELEMENTWISE:
            for s in node.src:
                for k in range(node.ndim):
                    same((s.uid, k), out[k])
        elif node.op in (Op.ADD, Op.SUB, Op.MUL, Op.DIV):
            for s in node.src:
                off = node.ndim - s.ndim
                for k in range(s.ndim):
                    if s.shape[k] == node.shape[k + off]:
                        same((s.uid, k), out[k + off])
        elif node.op is Op.EINSUM:
            eq: Einsum = node.arg
            occ: dict[str, list] = {}
            big = {ch for s, x in zip(eq.inputs, node.src) for ch, d in zip(s, x.shape) if d != 1}
            for s, x in zip(eq.inputs, node.src):
                for k, ch in enumerate(s):
                    if x.shape[k] != 1 or ch not in big:  # skip only size-1 axes broadcast against others
                        occ.setdefault(ch, []).append((x.uid, k))
            for k, ch in enumerate(eq.output):
                occ.setdefault(ch, []).append(out[k])
            for ch, elems in occ.items():
                for e in elems[1:]:
                    space.union(elems[0], e)
                if ch in eq.output:
                    for e in elems[1:]:
                        var.union(elems[0], e, 0)
                elif len(elems) == 2:
                    var.union(elems[0], elems[1], 1)  # a contradiction becomes a metric letter below
        elif node.op is Op.SUM:
            kept = [k for k in range(node.src[0].ndim) if k not in node.arg]
            for k, kk in enumerate(kept):
                same((node.src[0].uid, kk), out[k])
        elif node.op is Op.RESHAPE:
            x = node.src[0]
            for gi, gj in B.reshape_groups(x.shape, node.shape):
                one = len(gi) == 1 and len(gj) == 1
                for a in gi:
                    for b in gj:
                        same((x.uid, a), (u, b), same_space=one)
            for a, b in _unit_pairs(x.shape, node.shape):  # keeps a sample axis of size 1 (N = 1)
                same((x.uid, a), (u, b))
        elif node.op is Op.PERMUTE:
            for k, p in enumerate(node.arg):
                same((node.src[0].uid, p), out[k])
        elif node.op is Op.EXPAND:
            x = node.src[0]
            off = node.ndim - x.ndim
            for k in range(x.ndim):
                if x.shape[k] == node.shape[k + off]:
                    same((x.uid, k), out[k + off])
        elif node.op in (Op.SLICE, Op.INDEX, Op.CAT, Op.PAD):
            dim = node.arg if node.op is Op.CAT else node.arg[0]
            for s in node.src:
                for k in range(node.ndim):
                    same((s.uid, k), out[k], same_space=(k != dim))
        elif node.op in (Op.GATHER, Op.SCATTER_ADD):
            x, idx = node.src
            dim = node.ndim + (node.arg if node.op is Op.GATHER else node.arg[0])
            for k in range(node.ndim):
                same((x.uid, k), out[k], same_space=(k != dim))
            off = node.ndim - idx.ndim
            for k in range(idx.ndim):
                if idx.shape[k] == node.shape[k + off] and (k + off != dim or node.op is Op.GATHER):
                    same((idx.uid, k), out[k + off])
                elif k + off == dim:
                    same((idx.uid, k), (x.uid, k + off))
        elif node.op is Op.NONDIFF:
            x = node.src[0]
            for k, kx in NONDIFF_FUNCTIONS[node.arg[0]].kept(node.arg[1], x.ndim):
                if x.shape[kx] == node.shape[k]:
                    same((x.uid, kx), out[k])

    # --- resolve classes -------------------------------------------------------------
    up_root, up_par = var.find(_UP)
    batch_root, _ = var.find(_BATCH)
    sample_space = space.find(("space", SAMPLE))
    names: dict = {}

    def resolve(node: Node, k: int) -> Index:
        e = (node.uid, k)
        size = node.shape[k]
        r, p = var.find(e)
        sroot = space.find(e)
        if r == batch_root or sroot == sample_space:
            if sroot != sample_space:
                return Index("b", size, "batch", Variance.BATCH)
            return Index("n", size, SAMPLE, Variance.BATCH)
        if size == 1 and node.indices[k].space == UNIT:
            return node.indices[k]
        if r == up_root:
            v = Variance.UP if p == up_par else Variance.LOW
        else:
            v = Variance.UP if p == 0 else Variance.LOW
        if sroot not in names:
            names[sroot] = f"h{len(names)}"
        return Index(names[sroot], size, names[sroot], v)

    data_dep: set[int] = set()
    for node in program.nodes:
        if (node.op is Op.INPUT and node.arg[0] == "data") or any(s.uid in data_dep for s in node.src):
            data_dep.add(node.uid)

    new: dict[int, Node] = {}
    for node in program.nodes:
        idx = []
        for k in range(node.ndim):
            ix = resolve(node, k)
            if ix.space == SAMPLE and node.uid not in data_dep:
                # a parameter-only value broadcast against the samples (size 1 when N = 1)
                ix = Index("1", ix.size, UNIT, Variance.BATCH) if ix.size == 1 else ix
            if any(i.name == ix.name for i in idx) and ix.space != UNIT:
                ix = Index(ix.name + "'" * sum(i.space == ix.space for i in idx), ix.size, ix.space, ix.variance)
            idx.append(ix)
        arg, src = node.arg, tuple(new[s.uid] for s in node.src)
        if node.op is Op.EINSUM:
            arg = Einsum(arg.inputs, arg.output, arg.metric | _needs_metric(arg, src))
        elif node.op in (Op.ADD, Op.SUB):
            src = tuple(_match_variance(s, tuple(idx)) for s in src)
        rebuilt = Node(node.op, src, arg, tuple(idx), node.where)
        if per_sample and not coupled:
            _check_samples(node, rebuilt)
        new[node.uid] = rebuilt
    return Program.of({k: new[v.uid] for k, v in program.outputs.items()})


def _needs_metric(eq: Einsum, src: tuple[Node, ...]) -> frozenset[str]:
    """Summed letters that are not an upper/lower pair of one space: the model contracts through
    the Euclidean metric there (``q . k``, ``sum_i x_i w_i w_i``), which the einsum records."""
    occ: dict[str, list[Index]] = {}
    for s, x in zip(eq.inputs, src):
        for ch, ix in zip(s, x.indices):
            if ix.size != 1 or ix.space != UNIT:
                occ.setdefault(ch, []).append(ix)
    out = set()
    for ch, ixs in occ.items():
        if ch in eq.output or all(ix.is_batch for ix in ixs):
            continue
        if not (len(ixs) == 2 and {ixs[0].variance, ixs[1].variance} == {Variance.UP, Variance.LOW}):
            out.add(ch)
    return frozenset(out)


def _match_variance(x: Node, out: tuple[Index, ...]) -> Node:
    """A sum of a vector and a covector (a parameter used both as a contraction partner and as an
    addend) identifies the two through the Euclidean metric: make that an explicit einsum."""
    off = len(out) - x.ndim
    target = list(x.indices)
    for k, ix in enumerate(x.indices):
        o = out[k + off]
        if ix.size == o.size and not ix.is_batch and ix.variance is not o.variance:
            target[k] = Index(ix.name, ix.size, o.space, o.variance)
    if tuple(target) == x.indices:
        return x
    L = B.letters(x.ndim)
    flipped = "".join(ch for ch, a, b in zip(L, x.indices, target) if a != b)
    return B.einsum([L], L, [x], metric=flipped, out_indices=target)


def _check_samples(old: Node, node: Node) -> None:
    """Per-sample quantities need every op to act on samples independently."""
    def fail(what: str):
        raise SampleMixingError(
            f"{what} in {old.where or 'the model'} ({format_node(node, {})}) couples the samples of a batch")

    in_s = [s.has_sample for s in node.src]
    if sum(ix.space == SAMPLE and ix.size > 1 for ix in node.indices) > 1:
        fail("pairing samples with samples (z @ z.T, h[:, None] - h[None])")
    if node.op is Op.EINSUM:
        eq = node.arg
        for s, x in zip(eq.inputs, node.src):
            ax = x.sample_axis()
            if ax is not None and s[ax] not in eq.output:
                fail("a contraction over the sample axis")
    elif node.op is Op.SUM and node.src[0].has_sample and not node.has_sample:
        fail("a sum over the sample axis")
    elif node.op in (Op.GATHER, Op.SCATTER_ADD):
        dim = node.ndim + (node.arg if node.op is Op.GATHER else node.arg[0])
        if node.src[0].sample_axis() == dim or node.sample_axis() == dim:
            fail("gathering or scattering along the sample axis")
    elif node.op in (Op.SLICE, Op.INDEX, Op.CAT, Op.PAD):
        dim = node.arg if node.op is Op.CAT else node.arg[0]
        if any(x.sample_axis() == dim for x in node.src):
            fail("slicing, padding, indexing or concatenating along the sample axis")
        if node.op is Op.CAT and len(set(in_s)) > 1:
            fail("concatenating per-sample and shared tensors")
    elif node.op is Op.RESHAPE and node.src[0].has_sample and not node.has_sample:
        fail("a reshape that merges the sample axis with others")


def one_sample(program: Program, cross_entropy: bool) -> Program:
    """The whole batch as one sample, for a model that couples its samples (train-mode BatchNorm):
    the output ``(N, C, *d)`` becomes ``(1, C, N, *d)`` for cross-entropy (the batch is one more
    position of a per-position loss) and ``(1, N, ...)`` otherwise. Mean and sum over the positions
    are the loss over the batch, so every batch quantity is exact; the program's inferred
    ``program`` must come from ``infer_indices(..., coupled=True)``."""
    out = program.outputs["output"]
    sample = Index("n", 1, SAMPLE, Variance.BATCH)
    one = B.reshape(out, (1,) + out.shape, (sample,) + out.indices)
    if cross_entropy and out.ndim >= 2:
        one = B.permute(one, (0, 2, 1) + tuple(range(3, one.ndim)))
    return Program.of({**program.outputs, "output": one})
