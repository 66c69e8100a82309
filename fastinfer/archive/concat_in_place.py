"""Concatenations written in place: each input's kernel writes straight into its slice of the output.

A SqueezeNet fire module (an Inception block alike) concatenates the outputs of two convolutions,
and the concatenation is one more kernel that reads every element and writes it again: SqueezeNet
1.0's eight took 4% of its time on one core, more than all its pooling. Once the tuned schedules
are applied, each producer's kernel gets a twin whose output parameter is the whole concatenation
and whose writes go through a strided view of its own slice: the first twin allocates the output
(``call_tir``), the others write into it in place (``call_tir_inplace``), and the copy is gone.

The twin is made from the scheduled kernel, so the schedule is the one its record holds: tuning
tasks, workloads and records are the same with or without this rewrite. It applies to the
concatenations :mod:`fastinfer.archive.concat` lowers (the innermost axis: NHWC channels) whose
every input is a kernel's only output, used by nothing else, in the same dataflow block; any other
concatenation, or a kernel whose text the rewrite cannot read back, stays as it was.
"""

from __future__ import annotations

import math
import re
from typing import Any

from fastinfer.archive.concat import MARK, static_shape

TWIN_SUFFIX = "_into_concat"  # a twin's name: its kernel's, then this


def write_in_place(mod: Any) -> Any:
    """``mod`` with every concatenation that qualifies (above) replaced by its producers' twins."""
    from tvm import relax

    main = mod["main"]
    made: dict[tuple, Any] = {}
    plans = {}
    for var, producers in _plans(mod, main).items():
        twins = _twins(mod, var, producers, made)
        if twins is not None:
            plans[var] = list(zip(producers, twins, strict=True))
    if not plans:
        return mod
    rewriter = _make_rewriter()(mod, plans)
    rewritten = rewriter.visit_expr(main)
    out = rewriter.builder_.get()
    out["main"] = rewritten
    return relax.transform.DeadCodeElimination()(out)


def _twins(mod: Any, var: Any, producers: list, made: dict) -> list | None:
    """Each producer's twin (made once per kernel, shape and offset), or None where a kernel has none."""
    full = static_shape(var)
    assert full is not None  # the concatenation of static shapes concat.legalize marked
    axis, offset, twins = len(full) - 1, 0, []
    for producer in producers:
        kernel = producer.value.args[0]
        key = (kernel.name_hint, tuple(full), offset)
        if key not in made:
            made[key] = writing_into(mod[kernel], full, axis, offset)
        if made[key] is None:
            return None
        twins.append(made[key])
        offset += int(producer.var.ty.shape[axis])
    return twins


def writing_into(func: Any, full_shape: list[int], axis: int, offset: int) -> Any:
    """A copy of the kernel ``func`` whose last parameter (its output) is ``full_shape``, of which it
    writes the slice starting at ``offset`` along ``axis``; None where its text does not read back.

    The kernel's body is untouched: its output buffer is re-declared as a view of the whole one
    (the same shape as before, the whole one's strides, the slice's offset), so every write lands
    in the slice, vectorized as the schedule made it."""
    import tvm

    text = func.script()
    name = func.params[-1].name
    signature = re.search(r"def main\((.*)\):\n", text)
    declared = re.search(rf"\b{re.escape(name)}: T\.Buffer\((\((?:[^()]|\([^()]*\))*\)), \"(\w+)\"\)", text)
    attrs = re.search(r"\n    T\.func_attr\(.*\)\n", text)
    if signature is None or declared is None or attrs is None or declared.start() > signature.end():
        return None
    shape, dtype = declared.groups()
    strides = [math.prod(full_shape[i + 1 :]) for i in range(len(full_shape))]
    whole = f'{name}_whole: T.Buffer(({", ".join(f"T.int64({d})" for d in full_shape)}), "{dtype}")'
    view = (
        f'    {name} = T.decl_buffer({shape}, "{dtype}", data={name}_whole.data, '
        f"strides=({', '.join(f'T.int64({s})' for s in strides)}), elem_offset=T.int64({offset * strides[axis]}))\n"
    )
    text = text[: declared.start()] + whole + text[declared.end() : attrs.end()] + view + text[attrs.end() :]
    try:
        twin = tvm.script.from_source(text)
    except Exception:  # TVMScript the parser does not take back (a kernel holding constants, say)
        return None
    return twin if len(twin.params) == len(func.params) else None


def _plans(mod: Any, main: Any) -> dict:
    """For each concatenation that qualifies, the bindings of its inputs, in order."""
    from tvm import relax

    uses: dict[Any, int] = {}

    def count(expr: Any) -> None:
        if isinstance(expr, relax.Var):
            uses[expr] = uses.get(expr, 0) + 1

    plans = {}
    for block in main.body.blocks:
        bindings = {binding.var: binding for binding in block.bindings}
        for binding in block.bindings:
            relax.analysis.post_order_visit(binding.value, count)
        for var, binding in bindings.items():
            if not _is_marked_concat(mod, binding.value):
                continue
            fields = list(binding.value.args[1].fields)
            producers = [bindings[field] for field in fields if field in bindings]
            if len(set(fields)) == len(producers) == len(fields) and all(map(_single_output_kernel, producers)):
                plans[var] = producers
    relax.analysis.post_order_visit(main.body.body, count)
    return {var: producers for var, producers in plans.items() if all(uses.get(p.var) == 1 for p in producers)}


def _is_marked_concat(mod: Any, value: Any) -> bool:
    from tvm import relax

    return (
        _is_call_tir(value)
        and isinstance(value.args[1], relax.Tuple)
        and bool(mod[value.args[0]].attrs.get(MARK, False))
    )


def _single_output_kernel(binding: Any) -> bool:
    """A binding ``call_tir(kernel, (args...))`` of one static-shape tensor."""
    return _is_call_tir(binding.value) and len(binding.value.args) == 2 and bool(static_shape(binding.var))


def _is_call_tir(value: Any) -> bool:
    import tvm
    from tvm import relax

    return isinstance(value, relax.Call) and value.op == tvm.ir.Op.get("relax.call_tir")


def _make_rewriter() -> Any:
    """The expression mutator of :func:`write_in_place`, defined lazily (TVM import)."""
    from tvm import relax

    @relax.expr_functor.mutator
    class Rewriter(relax.PyExprMutator):
        def __init__(self, mod: Any, plans: dict) -> None:
            super().__init__(mod)
            self.plans = plans
            self.moved = {producer.var for pairs in plans.values() for producer, _ in pairs}
            self.added: dict[int, Any] = {}  # id(twin) -> its GlobalVar

        def visit_var_binding_(self, binding: Any) -> None:
            if binding.var in self.moved:
                return  # emitted where its concatenation was, as a twin
            if binding.var not in self.plans:
                return super().visit_var_binding_(binding)
            out_ty, joined = binding.var.ty, None
            for producer, twin in self.plans[binding.var]:
                kernel = self._added(twin, producer.value.args[0].name_hint)
                args = [self.visit_expr(arg) for arg in producer.value.args[1].fields]
                if joined is None:
                    joined = self.builder_.emit(relax.call_tir(kernel, args, out_ty))
                else:
                    joined = self.builder_.emit(relax.op.call_tir_inplace(kernel, [*args, joined], [len(args)], out_ty))
            self.set_var_remap(binding.var, joined)

        def _added(self, twin: Any, name: str) -> Any:
            if id(twin) not in self.added:
                self.added[id(twin)] = self.builder_.add_func(twin, name + TWIN_SUFFIX)
            return self.added[id(twin)]

    return Rewriter
