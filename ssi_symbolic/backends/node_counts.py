"""How many nodes per dimension a generated module's quadratures get: the candidates, the
probe states and the search (choose_nodes) that picks, for the nodes of each dimension, the
smallest count meeting QUADRATURE_TOLERANCE, within the point and probing budgets."""
from __future__ import annotations

import numpy as np

from ..background import Background
from ..model.spec import overlap_index


#: requested accuracy of every quadrature node: |Q_n - Q_2n| <= tol max(1, |Q_2n|)
QUADRATURE_TOLERANCE = 1e-8
#: candidate nodes per dimension; the tensor rule of a k-dimensional node has n^k points
NODE_CANDIDATES = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384)
#: Gauss-Legendre points of the orthant integrals (analytic integrands on [0, 1]) when the
#: module has no tensor node
ORTHANT_CANDIDATES = (8, 12, 16, 24, 32, 48, 64)
MAX_POINTS = 2 ** 20
#: at most this many integrand evaluations per probe state in one rule that choose_nodes
#: evaluates (a three-dimensional group of 18 integrands at 64 nodes per dimension took 10 s)
PROBE_WORK = 2 ** 21
#: a probe rule of at least this many integrand evaluations per state (points times
#: integrands) is evaluated on two cores, half of the probe states each
SPLIT_WORK = 2 ** 14


def _probe_states(spec) -> list:
    """A few fixed states spread over the ball (state order of the spec), for choosing nodes.
    With several directions, valid ones: M[k, j] = radius (0.8 if j = k else 0.3) (-1)^(k+j),
    E = 0 and Q = M P^-1 M^T + S, S[k, k] = q - (M P^-1 M^T)[k, k] (1 - |M_k|^2_P under
    spherical SGD) and S[k, h] = 0.2 sqrt(S[k, k] S[h, h]) (positive definite)."""
    names = spec.overlap_names
    out = []
    multi = spec.teacher_directions > 1 or spec.student_directions > 1
    if multi:
        K, Ks = spec.student_directions, spec.teacher_directions
        P = np.eye(Ks) if not spec.teacher_overlaps else np.array(
            spec.teacher_overlaps, dtype=float)
    for radius, q in ((0.0, 1.0), (0.35, 1.0), (0.7, 1.3), (0.92, 0.8)):
        if multi:
            M = np.array([[radius * (0.8 if j == k else 0.3) * (-1) ** (k + j)
                           for j in range(Ks)] for k in range(K)])
            G = M @ np.linalg.solve(P, M.T)
            sk = (1.0 if spec.spherical else q) - np.diag(G)
            Q = G + 0.2 * np.sqrt(np.outer(sk, sk)) + 0.8 * np.diag(sk)
            values = {"m": M, "e": np.zeros((K, max(spec.r, 1))), "q": Q}
            out.append([float(values[name[0]][overlap_index(name)[1:]]) for name in names])
            continue
        v = []
        for i, name in enumerate(names):
            if name.startswith("q"):
                v.append(q if not spec.spherical else 1.0)
            else:
                v.append(radius * (0.8 if i == 0 else 0.45) * (-1) ** i)
        out.append(v)
    return out


def choose_nodes(text: str, spec) -> tuple[int, dict, dict]:
    """(n, {k: n_k}, unverified): nodes per dimension that meet QUADRATURE_TOLERANCE at the
    probe states (the n rule versus the 2n rule) for every quadrature node of the module's
    source, each the smallest of NODE_CANDIDATES whose 2n rule has at most MAX_POINTS points
    (but for a candidate whose failure a finer rule already shows, see _smallest_passing), or
    the largest such when none meets it (the runtime error estimate of quadrature_error then
    says how far off it is). A candidate is probed only while its 2n rule takes at most
    PROBE_WORK integrand evaluations per probe state; past that, when every probed one
    failed, the next candidate is taken unprobed. `unverified` is {k: n_k} for the
    dimensions whose count no test showed to meet the tolerance (the last candidate taken,
    or the next unprobed one): the module lists them (QUADRATURE_UNVERIFIED) and `ssi
    derive` says so; the four-dimensional nodes of the L = 3 erf/tanh case (16 per
    dimension, the most MAX_POINTS allows) miss it by orders of magnitude. A module probed
    whole (orthant integrals) lists every dimension of its nodes, or 1 for the orthant
    integrals alone.

    The nodes of each dimension k get their own count n_k: n is that of the highest
    dimension, and the dict lists the dimensions whose count differs (the module's
    QUADRATURE_NODE_FACTORS are n_k / n). One count for all would hold the one- and
    two-dimensional nodes of a three-token statistic to the 16 nodes per dimension that
    MAX_POINTS allows its four-dimensional ones (errors of 1e-3 where 64 nodes give 1e-10).
    A module with orthant probabilities (their Gauss-Legendre t-integrals, runtime._orthant,
    read QUADRATURE_NODES in the state functions) is probed whole with one count, from
    ORTHANT_CANDIDATES when those are its only quadrature.

    A rule of SPLIT_WORK or more integrand evaluations per probe state is evaluated in two
    halves of the states, the second in a forked child on the second core (idle then: the
    parent has printed the state functions); the halves are evaluated apart with or without
    a child, so the counts do not depend on whether one ran."""
    import inspect
    import types
    ns = types.ModuleType("_ssi_probe")
    exec(compile(text, "<generated module probe>", "exec"), ns.__dict__)
    # every group of nodes, and every node with its own integrand (not an entry of a group)
    names = sorted(vars(ns))
    probes = ([(k, "_gh_integrand_g" + k[len("_gh_group_"):]) for k in names
               if k.startswith("_gh_group_")]
              + [(k, "_gh_integrand_" + k[len("_gh_node_"):]) for k in names
                 if k.startswith("_gh_node_") and "_gh_integrand_" + k[len("_gh_node_"):] in names])
    nodes = [getattr(ns, k) for k, _ in probes]
    dims, counts = zip(*[_node_shape(text, integrand) for _, integrand in probes]) if probes \
        else ((), ())
    params = {k: float(v) for k, v in spec.parameters.items()}
    orthants = _orthant_functions(text)
    for name in orthants:
        f = getattr(ns, name)
        eta = {"eta": 0.5} if "eta" in inspect.signature(f.__wrapped__).parameters else {}

        def probe(*st, n, f=f, eta=eta, **kw):
            ns.QUADRATURE_NODES = n
            return np.array(f(*st, **eta, **kw), dtype=float)
        nodes.append(probe)
    # the probe states as arrays: every function evaluates all of them in one call
    states = _probe_states(spec)
    st = [np.array([s[i] for s in states], dtype=float) for i in range(len(states[0]))]
    values = {}  # (node, n) -> its values: the 2n rule of one candidate is the next's n
    half = len(states) // 2

    def value(i, n):
        if (i, n) not in values:
            def on(lo, hi):
                return np.asarray(nodes[i](*[a[lo:hi] for a in st], **params, n=n),
                                  dtype=float)
            if i >= len(dims) or n ** dims[i] * counts[i] >= SPLIT_WORK:
                # a large rule: the second half of the probe states on the second core (a
                # forked child); the halves are evaluated apart whether or not a child ran,
                # so the values do not depend on where they were computed
                child = Background(lambda: on(half, len(states)))
                try:
                    here = on(0, half)
                    there = child.result()
                finally:
                    child.close()
                if there is None:  # no child, or it failed: its half computed here
                    there = on(half, len(states))
                values[i, n] = np.concatenate([here, there], axis=-1)
            else:
                values[i, n] = on(0, len(states))
        return values[i, n]

    def allowed(k, candidates=NODE_CANDIDATES):
        return [n for n in candidates if (2 * n) ** k <= MAX_POINTS] or [8]

    def computed(i):
        return [n for j, n in values if j == i]

    if orthants or not probes:
        kmax = max(dims, default=1)
        n, verified = _smallest_passing(list(range(len(nodes))), allowed(
            kmax, NODE_CANDIDATES if probes else ORTHANT_CANDIDATES), value, computed)
        return n, {}, ({} if verified else {k: n for k in sorted(set(dims) or {1})})
    by_dim, unverified = {}, {}
    for k in sorted(set(dims)):
        members = [i for i, d in enumerate(dims) if d == k]
        work = sum(counts[i] for i in members)  # integrands evaluated per point
        ns_k = allowed(k)
        # probed while the 2n rule's points times integrands stay within PROBE_WORK; past
        # that, the next candidate is taken unprobed when every probed one failed
        probed = [n for n in ns_k[:-1] if (2 * n) ** k * work <= PROBE_WORK]
        by_dim[k], verified = _smallest_passing(members, ns_k[:len(probed) + 1], value,
                                                computed)
        if not verified:
            unverified[k] = by_dim[k]
    n = by_dim[max(by_dim)]
    return n, {k: n_k for k, n_k in by_dim.items() if n_k != n}, unverified


def _smallest_passing(order, allowed, value, computed=lambda i: ()) -> tuple[int, bool]:
    """(n, True) for the first n of `allowed` whose rule agrees with the 2n rule within
    QUADRATURE_TOLERANCE (relative, absolute below 1) for the nodes `order` at every probe
    state where the 2n rule is finite; (the last of `allowed`, False) when none does (not
    evaluated: its 2n rule is the most expensive, 32^4 points for a 4-d node, so nothing
    shows that it meets the tolerance). value(i, n): node i's
    values with n nodes per dimension (cached by the caller); computed(i): the n whose
    values node i has already.

    A candidate whose rule differs from a finer rule already computed (any r > n) by more
    than twice the tolerance fails without its 2n rule: with errors that shrink as the rule
    grows, |Q_n - Q_r| <= 2 err(n), so err(n) exceeds the tolerance, and |Q_n - Q_2n| >=
    err(n) - err(2n) does too once err(2n) is far below err(n). The gelu case's 48 fails
    against its 64 rule (computed as the 2n rule of 32): its 96 rule, a fifth of the node
    choice, is never needed. When n is the last candidate but one, the last one's rule (taken
    unprobed if n fails, and cheaper than the 2n rule) is computed first for that check: the
    L = 3 case's three-dimensional nodes fail at 16 against their 24 rule (0.2 s) without
    the 32 rule (0.55 s). A wrong skip could only give a larger count, whose own 2n test
    still holds it to the tolerance (or the last candidate, as when n fails)."""
    with np.errstate(all="ignore"):
        for n in allowed[:-1]:
            ok = True
            for i in order:
                a = value(i, n)
                finer = [r for r in computed(i) if r > n]
                if 2 * n not in finer and n == allowed[-2] and allowed[-1] < 2 * n:
                    # the last candidate comes unprobed if n fails: its cheaper rule (24^3
                    # points against 32^3 for the L = 3 case's three-dimensional nodes) may
                    # show the failure without the 2n rule
                    finer.append(allowed[-1])
                if finer and 2 * n not in finer:
                    b = value(i, max(finer))
                    if not _agree(a, b, 2 * QUADRATURE_TOLERANCE):
                        ok = False
                if ok:
                    ok = _agree(a, value(i, 2 * n), QUADRATURE_TOLERANCE)
                if not ok:
                    order.remove(i)  # the node that failed is tried first next time
                    order.insert(0, i)
                    break
            if ok:
                return n, True
    return allowed[-1], False


def _agree(a, b, tol) -> bool:
    """|a - b| <= tol max(1, |b|) at every probe state (last axis) where b is finite."""
    good = np.isfinite(b).all(axis=tuple(range(b.ndim - 1)))
    close = np.abs(a - b) <= tol * np.maximum(1.0, np.abs(b))
    return bool(close.all(axis=tuple(range(b.ndim - 1)))[good].all())


def _orthant_functions(text: str) -> list:
    """Names of the module's top-level functions (other than the helpers) that call _orthant
    or _orthants."""
    out = []
    for block in text.split("\ndef ")[1:]:
        name = block[:block.index("(")]
        if name not in ("_orthant", "_orthants") and "_orthant" in block.split("\n\n\n")[0]:
            out.append(name)
    return out


def _node_shape(text: str, integrand: str) -> tuple[int, int]:
    """(dimension k, number of integrands) of the node (or group) of an integrand function,
    read from its _gh_expect, _gh_expect_many or _split_expect call."""
    key = f"({integrand}, "
    j = text.index(key) + len(key)
    k = int(text[j:text.index(",", j)])
    if "_gh_expect_many(" not in text[text.rindex("\n", 0, j):j]:
        return k, 1
    j = text.index(",", j) + 2
    return k, int(text[j:text.index(",", j)])


__all__ = ["choose_nodes", "QUADRATURE_TOLERANCE", "NODE_CANDIDATES", "MAX_POINTS",
           "PROBE_WORK"]
