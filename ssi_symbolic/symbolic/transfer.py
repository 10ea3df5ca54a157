"""SymPy expressions sent from one process to another exactly as they are.

A forked child that computed expectations (background.two_ends) sends them back through a pipe.
pickle would rebuild every sum and product through its constructor, which evaluates (flattens,
sorts, distributes numbers over sums) again: slower than the computation's own cost of reading
them, and free to give an equal but differently shaped expression from the one the child had,
so that the generated module would depend on which process computed what. Here an expression is
sent as its DAG, each distinct subexpression once: atoms (symbols, numbers, constants) by
pickle, every other node as its class and the indices of its arguments, rebuilt without
evaluation (Add and Mul from their arguments as they are, anything else with evaluate=False).
"""
from __future__ import annotations

import pickle

import sympy as sp


def pack(exprs) -> bytes:
    """The SymPy expressions `exprs` (a list) as bytes for :func:`unpack`."""
    index, nodes = {}, []
    roots = []
    for root in exprs:
        root = sp.sympify(root)
        stack = [(root, False)]
        while stack:
            e, ready = stack.pop()
            if e in index:
                continue
            if not e.args:
                index[e] = len(nodes)
                nodes.append((None, e))
            elif ready:
                index[e] = len(nodes)
                nodes.append((e.func, tuple(index[a] for a in e.args)))
            else:
                stack.append((e, True))
                stack.extend((a, False) for a in reversed(e.args) if a not in index)
        roots.append(index[root])
    return pickle.dumps((nodes, roots), protocol=pickle.HIGHEST_PROTOCOL)


def _build(func, args):
    if func is sp.Add or func is sp.Mul:
        return func._from_args(args)
    try:
        return func(*args, evaluate=False)
    except TypeError:  # a class whose constructor takes no evaluate flag (Tuple, pairs)
        return func(*args)


def _interned(exprs) -> dict:
    """Every subexpression of `exprs`, mapped to itself (a walk by identity)."""
    table, seen = {}, set()
    stack = list(exprs)
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        table.setdefault(e, e)
        stack.extend(e.args)
    return table


def unpack(data: bytes, known=()) -> list:
    """The expressions given to :func:`pack`, structurally identical (same srepr). Every
    subexpression equal to one of the expressions `known` (this process's own results) is
    that very object: later walks and dictionaries (node extraction, the cse) then meet one
    object where they would otherwise compare two equal trees node by node."""
    nodes, roots = pickle.loads(data)
    table = _interned(known)
    built = []
    for func, x in nodes:
        e = x if func is None else _build(func, [built[i] for i in x])
        built.append(table.setdefault(e, e))
    return [built[i] for i in roots]


__all__ = ["pack", "unpack"]
