"""Elementwise functions: one sympy expression each; sympy derives every derivative order.

A derivative is stored in whichever form is cheaper: in terms of the input ``x``, or of
the forward output ``y = f(x)`` (``tanh' = 1 - y**2``, ``sigmoid' = y (1 - y)``), found by
substituting the function's inverse and simplifying. Registering a function is one line;
the test suite picks it up automatically and checks every order against torch.func.
"""
from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from typing import Callable

import sympy as sp
import torch
import torch.nn.functional as F

__all__ = ["ElementwiseFn", "ELEMENTWISE_FNS", "register_elementwise", "derivative", "derivative_expr",
           "uses_output", "is_zero", "MAX_ORDER"]

x = sp.Symbol("x", real=True)
y = sp.Symbol("y", real=True)
_ypos = sp.Symbol("y", positive=True)
MAX_ORDER = 3


@dataclass(frozen=True)
class ElementwiseFn:
    name: str
    expr: sp.Expr  # f(x; params)
    params: tuple[str, ...]  # parameter names (sympy symbols of the same names)
    forward: Callable  # native torch implementation (x, *params) -> f(x)
    inverse: sp.Expr | None = None  # x as a function of y, if y-forms should be tried
    y_positive: bool = False  # the inverse only holds for y > 0 (e.g. sqrt)
    y_forms: bool = True  # try substituting y = f(x) into the derivatives
    example_params: tuple = ()  # parameter values the test suite uses
    domain: str = "real"  # "real" or "positive": where the test suite samples x


ELEMENTWISE_FNS: dict[str, ElementwiseFn] = {}


def register_elementwise(name: str, expr, forward: Callable, params: tuple[str, ...] = (),
                         inverse=None, y_positive: bool = False, y_forms: bool = True,
                         example_params: tuple = (), domain: str = "real") -> ElementwiseFn:
    """Register an elementwise function. Duplicate names are an error."""
    if name in ELEMENTWISE_FNS:
        raise ValueError(f"elementwise function '{name}' is already registered")
    if len(example_params) != len(params):
        raise ValueError(f"'{name}': give example_params for the parameters {params} (the tests use them)")
    fn = ElementwiseFn(name, sp.sympify(expr), tuple(params), forward, inverse, y_positive, y_forms,
                       tuple(example_params), domain)
    ELEMENTWISE_FNS[name] = fn
    return fn


def _cost(e: sp.Expr) -> int:
    return int(sp.count_ops(e, visual=False))


def _new_denominator(cand: sp.Expr, ref: sp.Expr) -> bool:
    """True if ``cand`` divides by x where ``ref`` does not (y/x is not x**(p-1) at x = 0)."""
    return sp.fraction(sp.together(cand))[1].has(x) and not sp.fraction(sp.together(ref))[1].has(x)


class Sigmoid(sp.Function):
    """sigmoid as a sympy function, so derivatives stay in the stable form s (1 - s)."""

    @classmethod
    def eval(cls, arg):
        if arg.is_Number:
            return 1 / (1 + sp.exp(-arg))

    def fdiff(self, argindex=1):
        return Sigmoid(self.args[0]) * (1 - Sigmoid(self.args[0]))


def _drop_deltas(e: sp.Expr) -> sp.Expr:
    return e.replace(lambda a: isinstance(a, sp.DiracDelta), lambda a: sp.S.Zero)


@functools.lru_cache(maxsize=None)
def derivative_expr(name: str, order: int) -> sp.Expr:
    """The ``order``-th derivative as a sympy expression in x, y and the parameters."""
    fn = ELEMENTWISE_FNS[name]
    dx = sp.powsimp(_drop_deltas(sp.diff(fn.expr, x, order))) if order else fn.expr
    if order == 0 or not fn.y_forms:
        return dx
    best = dx
    if fn.inverse is not None:
        ysym = _ypos if fn.y_positive else y
        cand = sp.simplify(dx.subs(x, fn.inverse.subs(y, ysym))).subs(ysym, y)
        if not cand.has(x) and _cost(cand) < _cost(best):
            best = cand
    cand = dx.subs(fn.expr, y)
    if cand != dx and _cost(cand) < _cost(best) and not _new_denominator(cand, dx):
        best = cand
    return best


# --- sympy -> torch source -----------------------------------------------------

_FUNCS = {Sigmoid: "torch.sigmoid", sp.exp: "torch.exp", sp.log: "torch.log", sp.tanh: "torch.tanh", sp.erf: "torch.erf",
          sp.Abs: "torch.abs", sp.sign: "torch.sign", sp.sin: "torch.sin", sp.cos: "torch.cos",
          sp.cosh: "torch.cosh", sp.sinh: "torch.sinh", sp.atan: "torch.atan"}


def _src(e: sp.Expr) -> str:  # noqa: C901
    if e.is_Symbol:
        return e.name
    if e.is_number:
        return repr(float(e))
    if isinstance(e, sp.Add):
        return "(" + " + ".join(_src(a) for a in e.args) + ")"
    if isinstance(e, sp.Mul):
        num, den = e.as_numer_denom()
        if den != 1:
            return f"({_src(num)} / {_src(den)})"
        return "(" + " * ".join(_src(a) for a in e.args) + ")"
    if isinstance(e, sp.Pow):
        b, p = e.args
        if p == sp.Rational(1, 2):
            return f"torch.sqrt({_src(b)})"
        if p == -sp.Rational(1, 2):
            return f"torch.rsqrt({_src(b)})"
        if p == -1:
            return f"(1.0 / {_src(b)})"
        if p.is_Integer:
            return f"({_src(b)} ** {int(p)})"
        return f"torch.pow({_src(b)}, {_src(p)})"
    if isinstance(e, sp.log) and isinstance(e.args[0], sp.Add) and sp.S.One in e.args[0].args:
        return f"torch.log1p({_src(e.args[0] - 1)})"
    if e.func in _FUNCS:
        return f"{_FUNCS[e.func]}({_src(e.args[0])})"
    if isinstance(e, sp.Heaviside):
        a = _src(e.args[0])
        return f"({a} > 0).to({a}.dtype)"
    if isinstance(e, (sp.Max, sp.Min)):
        f = "torch.maximum" if isinstance(e, sp.Max) else "torch.minimum"
        a, *rest = e.args
        out = _tensor(a)
        for r in rest:
            out = f"{f}({out}, {_tensor(r)})"
        return out
    if isinstance(e, sp.Piecewise):
        *pieces, (last, _) = e.args
        out = _tensor(last)
        for val, cond in reversed(pieces):
            out = f"torch.where({_src(cond)}, {_tensor(val)}, {out})"
        return out
    if isinstance(e, (sp.Or, sp.And)):
        op = " | " if isinstance(e, sp.Or) else " & "
        return "(" + op.join(_src(a) for a in e.args) + ")"
    if isinstance(e, sp.Not):
        return f"(~{_src(e.args[0])})"
    if isinstance(e, sp.core.relational.Relational):
        return f"({_src(e.lhs)} {e.rel_op} {_src(e.rhs)})"
    raise NotImplementedError(f"no torch printing for sympy {e.func}")


def _tensor(e: sp.Expr) -> str:
    """Like _src but guaranteed to be a tensor of x's dtype (torch.where needs one)."""
    return f"x.new_full((), {_src(e)})" if not e.free_symbols & {x, y} else _src(e)


@functools.lru_cache(maxsize=None)
def derivative(name: str, order: int) -> Callable:
    """A torch function ``f(x, y, *params)`` computing the ``order``-th derivative.

    Order 0 is the native forward. The function's ``__name__`` and ``hogc_source`` make the
    emitted code readable.
    """
    fn = ELEMENTWISE_FNS[name]
    if order == 0:
        return fn.forward
    e = derivative_expr(name, order)
    args = ", ".join(("x", "y") + fn.params)
    body = _tensor(e) if e.free_symbols & {x, y} else f"torch.full_like(x, {_src(e)})"
    fname = f"{name}_d{order}"
    source = f"def {fname}({args}):\n    return {body}\n"
    ns: dict = {"torch": torch}
    exec(compile(source, f"<hogc elementwise {fname}>", "exec"), ns)
    f = ns[fname]
    f.hogc_source = source
    f.__module__ = __name__  # so torch.fx can name it in generated code
    globals()[fname] = f
    return f


def _tensor_valued(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Name) and n.id in ("x", "y") for n in ast.walk(node))


def _live_tensors(node: ast.AST) -> int:
    """Tensors alive at once while Python evaluates the emitted expression ``node`` left to right:
    names and numbers are inputs or scalars; every operation makes one new tensor, ``c / t`` two
    (torch computes it as ``t.reciprocal() * c``); an operand stays alive until its operation ran."""
    if isinstance(node, (ast.Name, ast.Constant)) or not _tensor_valued(node):
        return 0  # an input, a number, or arithmetic on numbers and parameters
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "new_full":
        return 0  # a 0-d scalar tensor
    kids = [c for c in ast.iter_child_nodes(node) if isinstance(c, ast.expr)]
    if isinstance(node, ast.Call):
        kids = list(node.args)
    peak, held = 0, 0
    for c in kids:  # Python evaluates operands left to right, holding each result
        n = _live_tensors(c)
        peak = max(peak, held + n)
        held += 1 if n else 0
    own = 2 if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and not _tensor_valued(node.left) \
        else 1
    return max(peak, held + own)


@functools.lru_cache(maxsize=None)
def temporaries(name: str, order: int) -> int:
    """Temporary tensors (each the size of the result) the emitted derivative function holds
    besides its result, counted on its source; the memory model adds them while the node runs."""
    if order == 0:
        return 0
    src = derivative(name, order).hogc_source
    expr = ast.parse(src).body[0].body[0].value
    return max(0, _live_tensors(expr) - 1)


def uses_output(name: str, order: int) -> bool:
    return order > 0 and derivative_expr(name, order).has(y)


def is_zero(name: str, order: int) -> bool:
    return order > 0 and derivative_expr(name, order) == 0


def gelu_tanh(x_: torch.Tensor) -> torch.Tensor:
    return F.gelu(x_, approximate="tanh")


# --- the registry ----------------------------------------------------------------

a, b, s, t, p = sp.symbols("alpha beta scale threshold p", real=True)
negative_slope, input_scale = sp.symbols("negative_slope input_scale", real=True)
_sig = Sigmoid(x)
_softplus = sp.Piecewise((x, b * x > t), (sp.log(1 + sp.exp(b * x)) / b, True))

register_elementwise("neg", -x, torch.neg)
register_elementwise("exp", sp.exp(x), torch.exp, inverse=sp.log(y), y_positive=True)
register_elementwise("log", sp.log(x), torch.log, domain="positive")
register_elementwise("sqrt", sp.sqrt(x), torch.sqrt, inverse=y**2, y_positive=True, domain="positive")
register_elementwise("rsqrt", 1 / sp.sqrt(x), torch.rsqrt, domain="positive")
register_elementwise("reciprocal", 1 / x, torch.reciprocal, inverse=1 / y, domain="positive")
register_elementwise("abs", sp.Abs(x), torch.abs)
register_elementwise("sign", sp.sign(x), torch.sign)
register_elementwise("pow", x**p, torch.pow, params=("p",), example_params=(2.5,), domain="positive",
                     y_forms=False)  # p*y/x would divide by zero at x = 0
register_elementwise("sin", sp.sin(x), torch.sin)
register_elementwise("cos", sp.cos(x), torch.cos)
register_elementwise("relu", sp.Max(x, 0), torch.relu)
lo, hi = sp.symbols("lo hi", real=True)
register_elementwise("clamp", sp.Piecewise((lo, x < lo), (hi, x > hi), (x, True)), torch.clamp,
                     params=("lo", "hi"), example_params=(-0.5, 0.7))
register_elementwise("leaky_relu", sp.Piecewise((x, x > 0), (negative_slope * x, True)),
                     F.leaky_relu, params=("negative_slope",), example_params=(0.2,))
register_elementwise(
    "elu", sp.Piecewise((s * x, x > 0), (s * a * (sp.exp(x * input_scale) - 1), True)),
    torch.ops.aten.elu.default, params=("alpha", "scale", "input_scale"),
    example_params=(1.3, 1.1, 0.8))
register_elementwise("softplus", _softplus, F.softplus,
                     params=("beta", "threshold"), example_params=(1.5, 2.0))
register_elementwise("sigmoid", _sig, torch.sigmoid)
register_elementwise("tanh", sp.tanh(x), torch.tanh, inverse=sp.atanh(y))
register_elementwise("logsigmoid", sp.log(_sig), F.logsigmoid)
register_elementwise("silu", x * _sig, F.silu)
register_elementwise("gelu", x * (1 + sp.erf(x / sp.sqrt(2))) / 2, F.gelu)
register_elementwise(
    "gelu_tanh", x * (1 + sp.tanh(sp.sqrt(2 / sp.pi) * (x + sp.Rational(44715, 1000000) * x**3))) / 2,
    gelu_tanh)
