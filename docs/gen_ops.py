"""Regenerate docs/ops.md from the rule tables: ``python docs/gen_ops.py``."""
from __future__ import annotations

from pathlib import Path

from hogc.capture.lower import supported_ops
from hogc.ir import Op
from hogc.passes.elementwise import ELEMENTWISE_FNS, derivative_expr
from hogc.passes.jvp_rules import jvp_rules
from hogc.passes.residual_rules import residual_kinds
from hogc.passes.vjp_rules import rule_kinds, vjp_rules


def render() -> str:
    lines = ["# Supported ops", "",
             "Generated from the rule tables by `python docs/gen_ops.py` (a test fails when this file is stale;",
             "`tests/test_lowerings.py` fails when a lowering has no test case).", "",
             "## ATen ops the capture lowers (`hogc/capture/aten.py`)", "",
             ", ".join(f"`{o}`" for o in supported_ops()), "",
             "The in-place variant `op_` of each lowered op (`relu_`, `add_`, `mul_`, ...) lowers to its",
             "functional twin, unless a view of the mutated tensor is read after the mutation (then",
             "`UnsupportedOpError`: an SSA program cannot show that read the new value).",
             "An op outside this list raises `hogc.UnsupportedOpError` with its name, the module path,",
             "the source line and this list.", "",
             "## Elementwise functions (`passes/elementwise.py`), first derivative as stored", "",
             "| function | f' (in x, or in y = f(x) where cheaper) |", "|---|---|"]
    lines += [f"| `{n}` | `{derivative_expr(n, 1)}` |" for n in ELEMENTWISE_FNS]
    lines += ["", "## Rule orders per IR op", "",
              "| op | kind | reverse (`vjp_rules`) | forward (`jvp_rules`) | second-order residual "
              "(`residual_rules`) |", "|---|---|---|---|---|"]
    lines += [f"| `{o.name}` | {rule_kinds.get(o, '-')} | {'yes' if o in vjp_rules else '-'} | "
              f"{'yes' if o in jvp_rules else '-'} | {residual_kinds.get(o, '-')} |" for o in Op]
    lines += ["",
              "## Losses", "",
              "`CrossEntropyLoss` (class-index targets), `MSELoss`, `BCEWithLogitsLoss`; reduction `mean` or `sum`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    Path(__file__).with_name("ops.md").write_text(render())
