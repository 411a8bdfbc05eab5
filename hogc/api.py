"""``hogc.compile``: the public entry point."""
from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hogc.passes.infer_indices import infer_indices, one_sample
from hogc.passes.pipeline import optimization_pipeline, run_pipeline

from .capture import capture
from .capture.losses import check_class_range, check_target, loss_spec
from .emit.fx import emit
from .emit.memory import predicted_peak
from .emit.random import draw_seed
from .errors import HogcError, InputDtypeError, MemoryBudgetError, SampleMixingError
from .explain import Explanation, explain
from .ir import Op, Program, format_program
from .quantities import derive, get_quantity
from .quantities.partition import PARTITION_STRATEGIES

__all__ = ["compile", "CompiledFunction", "BACKENDS"]

#: how the emitted program runs: as emitted, handed to torch.compile (Inductor), or Inductor on CUDA only
BACKENDS = ("eager", "inductor", "auto")


def _backend(gm: torch.fx.GraphModule, backend: str, device_type: str):
    """(what a call runs, the explanation line) for ``backend`` on ``device_type``. Random draws
    (Monte-Carlo columns, dropout) are tensor arithmetic on a seed input (``hogc.emit.random``),
    so every program compiles as one graph."""
    if backend == "eager" or (backend == "auto" and device_type != "cuda"):
        why = "eager: the emitted GraphModule as is" + (" ('auto' on the CPU)" if backend == "auto" else "")
        return gm, why
    compiled = torch.compile(gm, backend="inductor", fullgraph=True, dynamic=False)
    return compiled, "inductor: torch.compile(fullgraph=True, dynamic=False) of the emitted GraphModule"


@dataclass
class _Specialization:
    program: Program  # the derivative program as emitted (after optimization passes)
    unoptimized: Program
    gm: torch.fx.GraphModule
    inputs: list[tuple[str, str]]
    num_classes: int | None  # cross-entropy: targets are checked against it on every call
    notes: dict[str, str]  # the strategy each quantity chose and why
    itemsize: int = 4  # bytes per element of the program's floating dtype
    coupled: bool = False  # the model couples its samples: the batch is one sample, y gets a leading 1
    run: object = None  # what a call runs: gm itself (eager) or its torch.compile'd version (inductor)

    def __post_init__(self):
        if self.run is None:
            self.run = self.gm


class CompiledFunction:
    """A compiled derivative program: ``fn(x, y)`` returns the requested quantities."""

    def __init__(self, model: nn.Module, quantities: Sequence[str], single: bool, loss: nn.Module,
                 mc_samples: int, seed: int | None, generator: torch.Generator | None, optimize: str,
                 verify: bool | None, top_k: int = 1, memory_budget: int | None = None,
                 partition: list[list[str]] | None = None, direction: dict | None = None,
                 allow_partial: bool = False, partition_strategy: str = "auto", kfac_approx: str | None = None,
                 backend: str = "eager"):
        self.model, self.quantities, self.single = model, tuple(quantities), single
        self.loss, self.spec = loss, loss_spec(loss)
        self.mc_samples, self.seed, self.generator = mc_samples, seed, generator
        self.optimize, self.verify, self.top_k = optimize, verify, top_k
        self.memory_budget = memory_budget
        self.partition, self.direction, self.allow_partial = partition, direction, allow_partial
        self.partition_strategy = partition_strategy
        self.kfac_approx = kfac_approx
        self.backend = backend
        self.takes_vector = any(get_quantity(q).takes_vector for q in self.quantities)
        self._cache: dict[tuple, _Specialization] = {}
        self._last: _Specialization | None = None

    # --- specialization --------------------------------------------------------------
    def _key(self, x, y, named) -> tuple:
        """What a program is specialized on: input and target shapes and dtypes, parameter dtypes,
        shapes and requires_grad, the module tree (identity, type, train/eval) and the loss."""
        ps = tuple((p.dtype, p.device, p.shape, p.requires_grad) for _, p in named)
        mods = tuple((id(m), type(m), m.training) for m in self.model.modules())
        return (x.shape, x.dtype, x.device, getattr(y, "shape", None), getattr(y, "dtype", None), ps, mods,
                self.spec)

    def clear_cache(self) -> None:
        """Forget every specialization (after changing a plain Python attribute the model reads in
        forward, which the cache cannot see)."""
        self._cache.clear()
        self._last = None

    def _specialize(self, x: torch.Tensor, y: torch.Tensor) -> _Specialization:
        """The pipeline: capture -> infer_indices -> derive -> fuse_einsums -> contract_pairwise -> emit."""
        forward = capture(self.model, x)
        check_target(self.spec, forward.outputs["output"].shape, y)
        per_sample = any(q != "loss" for q in self.quantities)  # every derivative follows samples
        notes: dict[str, str] = {}
        try:
            forward = run_pipeline(captured := forward, [functools.partial(infer_indices, per_sample=per_sample)],
                                   self.verify, verify_input=False)
            coupled = False
        except SampleMixingError as e:
            forward, coupled = self._coupled(captured, e, notes), True
        out = forward.outputs["output"]
        if out.sample_axis() != 0:  # samples merged, moved or summed away: the batch as one sample
            where = "is missing" if out.sample_axis() is None else f"is at position {out.sample_axis()}"
            forward, coupled = self._coupled(captured, SampleMixingError(
                f"the model output (shape {out.shape}) does not keep the samples of x on its first axis (the sample "
                f"axis {where})"), notes), True
            out = forward.outputs["output"]
        shapes = {k: tuple(p.shape) for k, p in self.model.named_parameters() if p.requires_grad}
        dtype = x.dtype if x.is_floating_point() else next(p.dtype for _, p in self.model.named_parameters())
        itemsize = torch.empty((), dtype=dtype).element_size()
        def derived(chunks: int) -> Program:
            return derive(forward, self.quantities, self.spec, dtype, shapes, self.mc_samples, self.top_k, notes,
                          self.partition, self.direction is not None, x.device.type, self.partition_strategy,
                          self.kfac_approx, chunks)

        unopt, program = self._within_budget(derived, itemsize, x.device.type, notes)
        used = {n.arg for n in program.inputs()}
        order = [("param", k) for k, p in self.model.named_parameters() if p.requires_grad] + \
                [("buffer", k) for k, p in self.model.named_parameters() if not p.requires_grad] + \
                [("buffer", k) for k, _ in self.model.named_buffers()] + \
                [("vector", k) for k, p in self.model.named_parameters() if p.requires_grad] + \
                [("direction", k) for k, p in self.model.named_parameters() if p.requires_grad] + \
                [("data", "x"), ("target", "y"), ("rng", "seed")]
        inputs = [i for i in order if i in used or i[0] in ("data", "target")]
        _check_fits(program, x, self.optimize, self.memory_budget, itemsize)
        gm = emit(program, inputs).to(x.device)  # captured constants follow the inputs
        run, notes["backend"] = _backend(gm, self.backend, x.device.type)
        classes = out.shape[1] if self.spec.kind == "cross_entropy" else None
        notes = {k: v for k, v in notes.items() if k in self.quantities or k in ("samples", "backend", "columns")}
        return _Specialization(program, unopt, gm, inputs, classes, notes, itemsize, coupled, run)

    def _within_budget(self, derived, itemsize: int, device_type: str, notes: dict[str, str]):
        """(derivative program, optimized program) from ``derived(column_chunks)``. A memory budget
        that slicing the networks cannot meet derives the program again with the square-root
        columns in 2, 4, ... chunks, one backward pass each, until it fits or every column is its
        own chunk (then the last MemoryBudgetError stands)."""
        passes = optimization_pipeline(self.optimize, self.memory_budget, itemsize, device_type)
        chunks = 1
        unopt = derived(chunks)
        while True:
            try:
                program = run_pipeline(unopt, passes, self.verify)
                break
            except MemoryBudgetError as e:
                columns = max((n.shape[0] for n in unopt.nodes
                               if n.op in (Op.LOSS_SQRT_HESSIAN, Op.LOSS_SQRT_HESSIAN_MC)), default=1)
                more = derived(min(2 * chunks, columns)) if chunks < columns else unopt
                if all(a is b for a, b in zip(more.outputs.values(), unopt.outputs.values())):
                    if chunks > 1:  # every column its own chunk, or no quantity sums over the columns
                        raise MemoryBudgetError(f"{e} (with the square-root columns already in {chunks} chunks, "
                                                f"one backward pass each)") from None
                    raise
                chunks, unopt = min(2 * chunks, columns), more
        if chunks > 1:
            notes["columns"] = (f"square-root columns in {chunks} chunks, one backward pass each, to meet "
                                f"memory_budget={self.memory_budget}")
        return unopt, program

    def _coupled(self, captured: Program, err: SampleMixingError, notes: dict[str, str]) -> Program:
        """A model that couples its samples (train-mode BatchNorm, a mean over the batch): batch
        quantities stay exact with the whole batch as one sample; per-sample ones are undefined."""
        per_sample = [q for q in self.quantities if get_quantity(q).per_sample]
        if per_sample:
            raise SampleMixingError(f"{err}. Per-sample quantities ({', '.join(per_sample)}) are undefined for such "
                                    f"a model; batch quantities (grad, ggn_diag, hessian_diag, ggn, hvp, ...) "
                                    f"work: the whole batch is then treated as one sample") from None
        notes["samples"] = (f"{err}: the batch is one sample (its samples are positions of the loss), so "
                            f"every batch quantity is exact")
        ce = self.spec.kind == "cross_entropy"
        return run_pipeline(captured, [functools.partial(infer_indices, per_sample=False, coupled=True),
                                       functools.partial(one_sample, cross_entropy=ce)],
                            self.verify, verify_input=False)

    def specialize(self, x: torch.Tensor, y: torch.Tensor, named=None) -> _Specialization:
        """Compile (or fetch from the cache) the program for these input shapes and dtypes."""
        if not isinstance(x, torch.Tensor):
            raise InputDtypeError(f"x must be a tensor, got {type(x).__name__}")
        if x.ndim == 0 or x.shape[0] == 0:
            raise HogcError(f"x must have a leading sample axis with at least one sample, got shape {tuple(x.shape)}")
        named = list(self.model.named_parameters()) if named is None else named
        self.spec = loss_spec(self.loss)  # the loss module may have been changed since compile
        key = self._key(x, y, named)
        spec = self._cache.get(key)
        if spec is None:
            spec = self._cache[key] = self._specialize(x, y)
        self._last = spec
        return spec

    # --- calling -------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, y: torch.Tensor, v: dict[str, torch.Tensor] | None = None, *,
                 generator: torch.Generator | None = None):
        """Evaluate the quantities at the model's current parameters.

        Args:
            x: inputs, samples on the first axis.
            y: targets for the loss.
            v: the direction of matrix-free products (``ggnvp``): a dict keyed and shaped like the
                trainable parameters.
            generator: random draws of Monte-Carlo quantities (overrides ``seed``/``generator`` of compile).
        """
        spec, args = self._arguments(x, y, v, generator)
        with torch.no_grad():
            flat = spec.run(*args)
        return self._assemble(flat, spec)

    def _arguments(self, x, y, v=None, generator=None) -> tuple[_Specialization, list]:
        """The specialization for these inputs and the program's positional arguments."""
        named = list(self.model.named_parameters())
        if self.partition is not None:
            self._check_partition(named)
        spec = self.specialize(x, y, named)
        if spec.num_classes is not None:
            check_class_range(y, spec.num_classes, self.spec.ignore_index)
        values = {("param" if p.requires_grad else "buffer", k): p for k, p in named}
        values.update({("buffer", k): b for k, b in self.model.named_buffers()})
        values[("data", "x")] = x
        values[("target", "y")] = y.unsqueeze(0) if spec.coupled else y
        if self.takes_vector:
            values.update(self._vector(v, named))
        elif v is not None:
            raise HogcError(f"a vector v was given, but none of {self.quantities} takes one (hvp and ggnvp do)")
        if self.direction is not None:
            values.update(self._vector(self.direction, named, "direction", role="direction"))
        if ("rng", "seed") in spec.inputs:
            values[("rng", "seed")] = draw_seed(self._rng(generator), x.device)
        return spec, [values[i] for i in spec.inputs]

    def _check_partition(self, named) -> None:
        """The partition was resolved at compile time: it must still fit the trainable parameters."""
        trainable = {k for k, p in named if p.requires_grad}
        covered = {k for sub in self.partition for k in sub}
        frozen = sorted(covered - trainable)
        if frozen:
            raise HogcError(f"parameters {frozen} of the partition are no longer trainable (requires_grad "
                            f"changed after compile); compile again")
        left = sorted(trainable - covered)
        if left and not self.allow_partial:
            raise HogcError(f"parameters {left} became trainable after compile and are not in the partition; "
                            f"compile again (or pass allow_partial=True)")

    def _vector(self, v, named, what: str = "the vector v", role: str = "vector") -> dict:
        """Checked program inputs ``(role, name)`` from a dict keyed like the trainable parameters;
        a partition direction may leave parameters out."""
        partial = role == "direction"
        names = [q for q in self.quantities if get_quantity(q).takes_vector]
        if not isinstance(v, dict):
            raise HogcError(f"{', '.join(names)} needs a vector: call fn(x, y, v) with v a dict keyed like the "
                            f"trainable parameters")
        out = {}
        for k, p in named:
            if not p.requires_grad:
                continue
            if k not in v:
                if partial:
                    continue
                raise HogcError(f"{what} has no entry '{k}' (it needs one per trainable parameter)")
            if not isinstance(v[k], torch.Tensor):
                raise HogcError(f"{what}['{k}'] must be a tensor, got {type(v[k]).__name__}")
            if tuple(v[k].shape) != tuple(p.shape):
                raise HogcError(f"{what}['{k}'] has shape {tuple(v[k].shape)}, the parameter {tuple(p.shape)}")
            if v[k].dtype != p.dtype:
                raise InputDtypeError(f"{what}['{k}'] has dtype {v[k].dtype}, the parameter {p.dtype}")
            out[(role, k)] = v[k]
        extra = set(v) - {k for k, p in named if p.requires_grad}
        if extra:
            raise HogcError(f"{what} has entries for unknown or frozen parameters: {sorted(extra)}")
        return out

    def _rng(self, generator):
        if generator is not None:
            return generator
        if self.generator is not None:
            return self.generator
        g = torch.Generator()  # on the CPU: one seed gives the same draws on every device
        g.manual_seed(self.seed if self.seed is not None else
                      int(torch.randint(0, 2**62, (1,)).item()))
        return g

    def _assemble(self, flat, spec: _Specialization):
        """Outputs named ``q``, ``q/param`` or ``q/param/k`` become a value, a dict, or a dict of tuples."""
        values = dict(zip(spec.program.outputs, flat))
        result = {}
        for qname in self.quantities:
            if not get_quantity(qname).per_param:
                result[qname] = values[qname]
                continue
            d: dict = {}
            for key, t in values.items():
                head, _, rest = key.partition("/")
                if head != qname:
                    continue
                param, _, part = rest.rpartition("/") if rest.count("/") >= 1 and rest.rsplit("/", 1)[1].isdigit() \
                    else (rest, "", "")
                if part:
                    d.setdefault(param, []).append((int(part), t))
                else:
                    d[rest] = t
            result[qname] = {k: tuple(t for _, t in sorted(v)) if isinstance(v, list) else v for k, v in d.items()}
        return result[self.quantities[0]] if self.single else result

    # --- introspection ---------------------------------------------------------------------
    def _require(self) -> _Specialization:
        if self._last is None:
            raise HogcError("this function has not been specialized yet: call it once, or call "
                            "fn.specialize(x, y), before reading .ir, .code or .explain()")
        return self._last

    @property
    def ir(self) -> str:
        """The derivative program (as emitted), one node a line, indices with their variance."""
        return format_program(self._require().program)

    def explain(self) -> Explanation:
        """The strategy each quantity chose and why, and every contraction of the emitted program
        with its FLOPs and result size (prints as a table)."""
        spec = self._require()
        return explain(spec.program, spec.notes, spec.itemsize, self.optimize, self.memory_budget)

    @property
    def code(self) -> str:
        """The generated Python/torch source."""
        return self._require().gm.code

    def __repr__(self) -> str:
        return f"hogc.CompiledFunction(quantity={self.quantities if not self.single else self.quantities[0]!r}, " \
               f"loss={self.loss!r})"


def _device_memory(device: torch.device) -> int | None:
    """Total memory of the device the program runs on (physical RAM for the CPU), if known."""
    try:
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[1]
        if device.type == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError, RuntimeError):
        pass
    return None


def _check_fits(program, x: torch.Tensor, optimize: str, memory_budget: int | None, itemsize: int) -> None:
    """Refuse a program whose predicted peak exceeds the device's whole memory: it could only
    crash (or be killed) at run time."""
    total = _device_memory(x.device)
    if total is None:
        return
    peak = predicted_peak(program, itemsize).peak
    if peak > total:
        raise MemoryBudgetError(
            f"the compiled program's predicted peak memory is {peak / 2**30:.1f} GiB with optimize={optimize!r}, "
            f"more than the {total / 2**30:.1f} GiB of the {x.device.type} device; use optimize='auto' or set "
            f"memory_budget= (bytes) to slice the contractions")


def compile(model: nn.Module, quantity: str | Sequence[str] = "ggn_diag", loss: nn.Module | None = None, *,
            mc_samples: int = 1, seed: int | None = None, generator: torch.Generator | None = None,
            optimize: str = "auto", memory_budget: int | None = None, verify: bool | None = None,
            top_k: int = 1, partition=None, direction: dict | None = None,
            allow_partial: bool = False, partition_strategy: str = "auto",
            kfac_approx: str | None = None, backend: str = "eager") -> CompiledFunction:
    """Compile derivative quantities of ``loss(model(x), y)``.

    Args:
        model: any ``nn.Module`` built from supported ops (see ``docs/ops.md``).
        quantity: one name (returns that quantity) or a sequence (returns a dict keyed by name).
        loss: ``CrossEntropyLoss`` (default), ``MSELoss`` or ``BCEWithLogitsLoss``, reduction
            'mean' or 'sum'.
        mc_samples: columns of the Monte-Carlo square root (``ggn_diag_mc``).
        seed: makes Monte-Carlo quantities reproducible (the same draw on every call).
        generator: a ``torch.Generator`` to draw from (also accepted per call).
        optimize: contraction-path strategy ('auto', 'naive', 'greedy', 'optimal', 'dp'; 'cotengra'
            when installed). 'naive' contracts in the order the passes wrote.
        partition: for ``partition_*`` quantities: a list of lists of parameter names, ``'module'``
            (one subset per module) or ``'parameter'`` (one per parameter tensor; the default).
        direction: the direction u of the partition quantities, a dict keyed like the covered
            parameters (default: the gradient at the same point); its tensors are read at every
            call, entries for parameters outside the partition are ignored.
        allow_partial: a partition may leave parameters out.
        partition_strategy: how ``partition_hessian``/``partition_d3`` are built: ``'dense'`` (all
            S directions as one tangent index, S x S tangent pairs through every layer: few large
            kernels, best on GPUs), ``'unrolled'`` (one push per subset and per unordered pair,
            restricted to the subsets ranked after it: the fewest FLOPs, best on CPUs) or
            ``'auto'`` (dense on CUDA, unrolled elsewhere).
        kfac_approx: how ``kflr``/``kfac`` treat positions a weight is shared over (a sequence, a
            convolution's output positions), after Eschenhagen et al. (2023): ``'expand'`` (each
            position one more sample: KFC for convolutions) or ``'reduce'`` (positions summed in
            the gradient and averaged in the input first: KFAC-reduce). Default: ``'expand'``, and
            BackPACK's convention for convolutions (positions summed in B, A summed over positions / N).
        backend: ``'eager'`` (the emitted GraphModule as is), ``'inductor'`` (handed to
            ``torch.compile``: elementwise chains and reductions fuse into C++ kernels on the CPU,
            Triton kernels on CUDA; compiling takes seconds to minutes, once per specialization)
            or ``'auto'`` (inductor on CUDA, eager elsewhere).
        memory_budget: bytes; slice contractions (loop over indices, summing or concatenating the
            chunks) until the predicted peak memory of the program fits (``fn.explain()`` shows it).
        verify: run the IR verifier after every pass (default: ``HOGC_VERIFY`` env var).
        top_k: how many of the largest GGN eigenvalues ``ggn_eigen`` returns.

    Returns:
        A :class:`CompiledFunction`; call it as ``fn(x, y)``.

    Raises:
        UnknownQuantityError: a quantity name that is not registered (lists valid ones).
        UnsupportedLossError: a loss without a known Hessian factorization.
        MemoryBudgetError (on the first call): no slicing fits ``memory_budget``; the message gives
            the smallest reachable predicted peak.
    """
    single = isinstance(quantity, str)
    names = [quantity] if single else list(quantity)
    if not names:
        raise HogcError("quantity must name at least one quantity")
    for q in names:
        get_quantity(q)
    if mc_samples < 1:
        raise HogcError(f"mc_samples must be >= 1, got {mc_samples}")
    from hogc.passes.paths import PATH_STRATEGIES
    if optimize not in PATH_STRATEGIES:
        raise HogcError(f"unknown optimize strategy '{optimize}'; registered: {sorted(PATH_STRATEGIES)}")
    if top_k < 1:
        raise HogcError(f"top_k must be >= 1, got {top_k}")
    if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, int)
                                      or memory_budget <= 0):
        raise HogcError(f"memory_budget must be a positive number of bytes (int), got {memory_budget!r}")
    if backend not in BACKENDS:
        raise HogcError(f"unknown backend {backend!r}; one of {BACKENDS}")
    from .quantities.kronecker import KFAC_APPROX
    if kfac_approx is not None and kfac_approx not in KFAC_APPROX:
        raise HogcError(f"unknown kfac_approx {kfac_approx!r}; one of {KFAC_APPROX} (or None)")
    if kfac_approx is not None and not {"kflr", "kfac"} & set(names):
        raise HogcError("kfac_approx= only applies to the kflr and kfac quantities")
    parts = None
    if any(q.startswith("partition_") for q in names):
        parts = resolve_partition(model, "parameter" if partition is None else partition, allow_partial)
        if direction is not None and any(get_quantity(q).takes_vector for q in names):
            raise HogcError("direction= and a quantity taking a vector v cannot be compiled together")
        if direction is not None and not isinstance(direction, dict):
            raise HogcError(f"direction must be a dict keyed like the parameters, got {type(direction).__name__}")
        if direction is not None:
            covered = {k for s_ in parts for k in s_}
            missing = covered - set(direction)
            if missing:
                raise HogcError(f"direction has no entry for {sorted(missing)} (one per parameter of the partition)")
        if partition_strategy not in PARTITION_STRATEGIES:
            raise HogcError(f"unknown partition_strategy {partition_strategy!r}; one of {PARTITION_STRATEGIES}")
    elif partition is not None or direction is not None or allow_partial or partition_strategy != "auto":
        raise HogcError("partition=, direction=, allow_partial= and partition_strategy= only apply to the "
                        "partition_* quantities")
    return CompiledFunction(model, names, single, loss if loss is not None else nn.CrossEntropyLoss(),
                            mc_samples, seed, generator, optimize, verify, top_k, memory_budget, parts,
                            None if direction is None else dict(direction), allow_partial, partition_strategy,
                            kfac_approx, backend)


def resolve_partition(model: nn.Module, partition, allow_partial: bool = False) -> list[list[str]]:
    """The subsets of trainable parameter names; checks names, overlaps and coverage."""
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise HogcError("the model has no trainable parameters to partition")
    if partition == "parameter":
        return [[k] for k in names]
    if partition == "module":
        groups: dict[str, list[str]] = {}
        for k in names:
            groups.setdefault(k.rpartition(".")[0], []).append(k)
        return list(groups.values())
    if isinstance(partition, str) or not isinstance(partition, (list, tuple)) or \
            not all(isinstance(s_, (list, tuple)) and s_ for s_ in partition) or not partition:
        raise HogcError(f"partition must be 'module', 'parameter' or a non-empty list of non-empty lists of "
                        f"parameter names, got {partition!r}")
    seen: dict[str, int] = {}
    for j, subset in enumerate(partition):
        for k in subset:
            if k not in names:
                raise HogcError(f"partition subset {j} names '{k}', which is not a trainable parameter; "
                                f"parameters: {names}")
            if k in seen:
                raise HogcError(f"partition subsets {seen[k]} and {j} overlap in '{k}'")
            seen[k] = j
    left = [k for k in names if k not in seen]
    if left and not allow_partial:
        raise HogcError(f"partition leaves out {left}; pass allow_partial=True to allow that")
    return [list(s_) for s_ in partition]
