"""LightGBM boosters compiled to flat numpy arrays, with a numba-compiled predictor.

Why: the position (exit) model and the risk model take *state-dependent* inputs (the open position's age and
unrealised result, the account's drawdown and streak), so the fast backtest cannot precompute their predictions for
all bars. Calling ``booster.predict`` once per bar from Python would cost ~50 us per call; walking the same trees
inside the compiled kernel costs well under a microsecond. The live bot uses the same :func:`predict` so the two
modes evaluate the trees with one implementation.

Semantics follow LightGBM's ``Tree::NumericalDecision`` (``include/LightGBM/tree.h``) exactly:

* ``missing_type`` ``None``: a NaN input is treated as ``0.0`` and compared against the threshold;
* ``missing_type`` ``Zero``: NaN becomes 0.0, and a value with ``|x| <= 1e-35`` goes to the default child;
* ``missing_type`` ``NaN``: a NaN goes to the default child (``default_left``);
* otherwise ``x <= threshold`` goes left.

The raw score is the sum of the trees' leaf values in tree order (the init score is folded into the first tree by
LightGBM), divided by the number of trees for ``average_output`` (random-forest mode). Categorical splits and linear
trees are refused: the project's features are all numeric. The test compares against ``booster.predict`` to 1e-9.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from numba import njit

MISSING_NONE = 0
MISSING_ZERO = 1
MISSING_NAN = 2
_MISSING_CODES = {"None": MISSING_NONE, "Zero": MISSING_ZERO, "NaN": MISSING_NAN}

OBJ_IDENTITY = 0  # regression objectives: prediction = raw score
OBJ_SIGMOID = 1  # binary / cross-entropy: prediction = 1 / (1 + exp(-k * raw))
OBJ_EXP = 2  # poisson / gamma / tweedie: prediction = exp(raw)

_K_ZERO_THRESHOLD = 1e-35  # LightGBM's kZeroThreshold


class CompiledTrees(NamedTuple):
    """A LightGBM model as flat arrays (numba-friendly: always the same field types, so one compilation).

    All nodes of all trees (internal nodes and leaves) share one numbering. ``feature[i] < 0`` marks a leaf whose
    value is ``values[i]``; for a split node ``values[i]`` is the threshold, its left child is ``child[i]`` and its
    right child ``child[i] + 1`` (children are stored side by side, so a step is ``child + go_right``), and
    ``flags[i] = missing_type | default_left << 2``. ``roots[t]`` is tree ``t``'s root.

    The ``f*`` arrays are the same trees laid out for the branch-free walk of :func:`predict_raw`: a leaf points to
    itself (``fchild[i] = i``, ``fthresh[i] = +inf``, ``ffeature[i] = 0``), so every tree can be walked exactly
    ``depth[t]`` steps with no test for "is this a leaf" (the step count is the same on every call, so the CPU
    predicts it and overlaps the walks of neighbouring trees). ``missing`` says which LightGBM missing-value modes
    occur (bit 0: NaN, bit 1: Zero); rows that could reach those special cases take the exact walker instead.
    """

    feature: np.ndarray  # int64[n_nodes] split feature, -1 = leaf
    child: np.ndarray  # int64[n_nodes] left child (right = left + 1)
    flags: np.ndarray  # int64[n_nodes] missing_type | default_left << 2
    values: np.ndarray  # float64[n_nodes] threshold (split) or leaf value
    roots: np.ndarray  # int64[n_trees]
    objective: int  # OBJ_* code
    sigmoid: float  # the k of "binary sigmoid:k"
    scale: float  # 1.0, or 1 / n_trees for average_output
    num_features: int  # the width of the input row the model expects
    ffeature: np.ndarray  # int64[n_nodes] split feature, 0 for a leaf
    fchild: np.ndarray  # int64[n_nodes] left child, the node itself for a leaf
    fthresh: np.ndarray  # float64[n_nodes] threshold, +inf for a leaf
    depth: np.ndarray  # int64[n_trees] longest root-to-leaf path
    missing: int  # bit 0: some split has missing_type NaN; bit 1: some split has missing_type Zero
    # binned lookup tables (:func:`_tables`); ``t_ok`` False = too large, the walker is used
    t_ok: bool
    t_thr: np.ndarray  # float64 all features' sorted unique thresholds, feature f at t_foff[f]:t_foff[f + 1]
    t_foff: np.ndarray  # int64[num_features + 1]
    t_contrib: np.ndarray  # int64[rows, n_trees] cell offset of (feature f, global bin g) in each tree's table
    t_roff: np.ndarray  # int64[num_features] first row of feature f in t_contrib
    t_leaf: np.ndarray  # float64 every tree's table of leaf values, tree t at t_loff[t]
    t_loff: np.ndarray  # int64[n_trees]
    t_cells: np.ndarray  # int64[n_trees] scratch: each tree's cell for one row (one per thread: engine's fork)
    # bucket index of the thresholds (:func:`_buckets`): feature f's global bin without a binary search
    t_bidx: np.ndarray  # int64 per feature, t_boff[f]: K_f + 1 counts of f's thresholds lying in buckets < k
    t_boff: np.ndarray  # int64[num_features] first entry of feature f in t_bidx
    t_bmin: np.ndarray  # float64[num_features] f's smallest threshold (bucket 0 starts there)
    t_bscale: np.ndarray  # float64[num_features] buckets per unit of x
    t_btop: np.ndarray  # float64[num_features] K_f - 1, the last bucket

    @property
    def n_trees(self) -> int:
        return int(self.roots.size)


def _walk_layout(feature: np.ndarray, child: np.ndarray, flags: np.ndarray, values: np.ndarray, roots: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """The ``f*`` arrays, depths and missing-mode bits of :class:`CompiledTrees` (see its docstring)."""
    leaf = feature < 0
    ffeature = np.where(leaf, 0, feature).astype(np.int64)
    fchild = np.where(leaf, np.arange(feature.size), child).astype(np.int64)
    fthresh = np.where(leaf, np.inf, values).astype(np.float64)
    depth = np.zeros(roots.size, dtype=np.int64)
    for t, r in enumerate(roots):
        stack = [(int(r), 0)]
        while stack:
            i, d = stack.pop()
            if feature[i] < 0:
                depth[t] = max(depth[t], d)
            else:
                stack.append((int(child[i]), d + 1))
                stack.append((int(child[i]) + 1, d + 1))
    mt = flags[~leaf] & 3
    missing = (1 if np.any(mt == MISSING_NAN) else 0) | (2 if np.any(mt == MISSING_ZERO) else 0)
    return ffeature, fchild, fthresh, depth, int(missing)


def _make(feature: np.ndarray, child: np.ndarray, flags: np.ndarray, values: np.ndarray, roots: np.ndarray,
          objective: int, sigmoid: float, scale: float, num_features: int) -> CompiledTrees:
    ffeature, fchild, fthresh, depth, missing = _walk_layout(feature, child, flags, values, roots)
    nf = max(int(num_features), int(feature.max()) + 1 if feature.size else 0)
    tables = _tables(feature, fchild, fthresh, ffeature, values, roots, depth, nf)
    return CompiledTrees(feature, child, flags, values, roots, int(objective), float(sigmoid), float(scale),
                         int(num_features), ffeature, fchild, fthresh, depth, missing, *tables)


TABLE_BUDGET = 1 << 22  # cells (and contribution entries) above which a model keeps the walker


def _tables(feature: np.ndarray, fchild: np.ndarray, fthresh: np.ndarray, ffeature: np.ndarray, values: np.ndarray,
            roots: np.ndarray, depth: np.ndarray, nf: int) -> tuple[Any, ...]:
    """Binned lookup tables: the exact leaf of every tree as a function of where each feature lies among the
    thresholds.

    A split ``x > thr`` only depends on how many of the tree's thresholds on that feature lie below ``x`` (its
    *local bin*). So each tree is a table over the product of its features' local bins, filled by walking the tree
    once per cell. At prediction time the bucket index (:func:`_buckets`) gives each feature's global bin ``g``
    (thresholds of all trees below ``x``); ``t_contrib[row_f + g, t]`` is that bin's offset in tree ``t``'s table
    (local bin x stride), so a tree costs a few independent loads and one table read instead of a chain of dependent,
    mispredicted node steps. Exact: every cell holds the leaf the walker reaches for any ``x`` in it."""
    n_trees = roots.size
    empty = (False, np.zeros(0), np.zeros(nf + 1, dtype=np.int64), np.zeros((0, max(n_trees, 1)), dtype=np.int64),
             np.zeros(nf, dtype=np.int64), np.zeros(0), np.zeros(n_trees, dtype=np.int64),
             np.zeros(n_trees, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(nf, dtype=np.int64),
             np.zeros(nf), np.zeros(nf), np.zeros(nf))
    split = feature >= 0
    if n_trees == 0 or nf == 0:
        return empty
    glob = [np.unique(values[split & (feature == f)]) for f in range(nf)]
    rows = sum(g.size + 1 for g in glob)
    if rows * n_trees > TABLE_BUDGET:
        return empty
    # nodes of each tree (a tree's nodes are contiguous from its root up to the next root)
    bounds = np.r_[roots, feature.size]
    local: list[list[np.ndarray]] = []
    cells = np.ones(n_trees, dtype=np.int64)
    for t in range(n_trees):
        nodes = np.arange(bounds[t], bounds[t + 1])
        lt = [np.unique(values[nodes[split[nodes] & (feature[nodes] == f)]]) for f in range(nf)]
        local.append(lt)
        for f in range(nf):
            cells[t] *= lt[f].size + 1
    if int(cells.sum()) > TABLE_BUDGET:
        return empty
    contrib = np.zeros((rows, n_trees), dtype=np.int64)
    roff = np.zeros(nf, dtype=np.int64)
    loff = np.r_[0, np.cumsum(cells)[:-1]].astype(np.int64)
    leaf = np.empty(int(cells.sum()), dtype=np.float64)
    r = 0
    for f in range(nf):
        roff[f] = r
        r += glob[f].size + 1
    for t in range(n_trees):
        lt = local[t]
        stride = np.ones(nf, dtype=np.int64)
        for f in range(1, nf):
            stride[f] = stride[f - 1] * (lt[f - 1].size + 1)
        for f in range(nf):
            g = glob[f]
            # global bin b (b thresholds of all trees below x) -> local bin: this tree's thresholds <= g[b - 1]
            lb = np.r_[0, np.searchsorted(lt[f], g, side="right")]
            contrib[roff[f]:roff[f] + g.size + 1, t] = lb * stride[f]
        c = np.arange(cells[t])
        lbin = (c[:, None] // stride[None, :]) % np.array([x.size + 1 for x in lt])[None, :]
        node = np.full(c.size, roots[t], dtype=np.int64)
        for _ in range(int(depth[t])):
            f = ffeature[node]
            is_split = split[node]
            rank = np.zeros(c.size, dtype=np.int64)
            for ff in np.unique(f[is_split]):
                m = is_split & (f == ff)
                rank[m] = np.searchsorted(lt[ff], fthresh[node[m]], side="left")
            right = is_split & (lbin[np.arange(c.size), f] > rank)
            node = np.where(is_split, fchild[node] + right, node)
        leaf[loff[t]:loff[t] + cells[t]] = values[node]
    thr = np.concatenate(glob) if rows - nf else np.zeros(0)
    foff = np.r_[0, np.cumsum([g.size for g in glob])].astype(np.int64)
    return (True, np.ascontiguousarray(thr, dtype=np.float64), foff, contrib, roff, leaf, loff,
            np.zeros(n_trees, dtype=np.int64), *_buckets(glob))


@njit(cache=True, inline="always")
def _bucket(v: float, lo: float, scale: float, top: float) -> int:
    """The bucket of value ``v`` of a feature whose bucket index starts at threshold ``lo`` (:func:`_buckets`): 0
    below (and for NaN), ``top`` above, else ``floor((v - lo) * scale)``. The one computation both the index and
    :func:`_predict_tables` use, so a value and a threshold land in buckets ordered as they are (it is monotone)."""
    z = (v - lo) * scale
    if not z > 0.0:
        return 0
    return int(top) if z >= top else int(z)


@njit(cache=True)
def _buckets_of(g: np.ndarray, lo: float, scale: float, top: float) -> np.ndarray:
    """:func:`_bucket` of every threshold in ``g``."""
    out = np.empty(g.size, dtype=np.int64)
    for i in range(g.size):
        out[i] = _bucket(g[i], lo, scale, top)
    return out


def _buckets(glob: list[np.ndarray]) -> tuple[np.ndarray, ...]:
    """Bucket index of each feature's sorted thresholds: ``K = min(2 n + 2, 1024)`` equal-width buckets from the
    smallest threshold to the largest. A row's value falls in bucket ``k``; the thresholds in earlier buckets are
    all below it (counted by ``t_bidx``) and those in later buckets all above it, so only the few thresholds in its
    own bucket are compared. Exact, and unlike a binary search it has no chain of mispredicted branches (measured:
    the search was 2/3 of a 30-tree prediction)."""
    nf = len(glob)
    boff = np.zeros(nf, dtype=np.int64)
    bmin = np.zeros(nf)
    bscale = np.zeros(nf)
    btop = np.zeros(nf)
    parts = []
    off = 0
    for f, g in enumerate(glob):
        k = min(2 * g.size + 2, 1024)
        lo, hi = (float(g[0]), float(g[-1])) if g.size else (0.0, 0.0)
        scale = (k - 1) / (hi - lo) if hi > lo and np.isfinite(hi - lo) else 0.0
        top = float(k - 1)
        cells = _buckets_of(np.ascontiguousarray(g, dtype=np.float64), lo, scale, top)  # too wide a range: all 0
        parts.append(np.searchsorted(cells, np.arange(k + 1), side="left").astype(np.int64))
        boff[f], bmin[f], bscale[f], btop[f] = off, lo, scale, top
        off += k + 1
    bidx = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return bidx, boff, bmin, bscale, btop


def empty_trees(num_features: int = 0) -> CompiledTrees:
    """A model with no trees (raw score 0). The kernel always receives a CompiledTrees, plus a 'use' flag: one
    signature, one compilation, whether or not the real model exists."""
    i = np.zeros(0, dtype=np.int64)
    return _make(i, i.copy(), i.copy(), np.zeros(0, dtype=np.float64), i.copy(), OBJ_IDENTITY, 1.0, 1.0,
                 int(num_features))


def _objective_code(objective: str) -> tuple[int, float]:
    parts = objective.split()
    name = parts[0] if parts else "regression"
    k = 1.0
    for p in parts[1:]:
        if p.startswith("sigmoid:"):
            k = float(p.split(":", 1)[1])
    if name in {"binary", "cross_entropy", "xentropy"}:
        return OBJ_SIGMOID, k
    if name in {"poisson", "gamma", "tweedie"}:
        return OBJ_EXP, 1.0
    if name in {"regression", "regression_l2", "regression_l1", "huber", "fair", "quantile", "mape", "l2", "l1",
                "mean_squared_error", "mse", "mae", "rmse", "root_mean_squared_error"}:
        return OBJ_IDENTITY, 1.0
    raise ValueError(f"unsupported LightGBM objective for compilation: {objective!r}")


def build_trees(trees: list[dict[str, Any]], objective: int = OBJ_IDENTITY, sigmoid: float = 1.0,
                average: bool = False, num_features: int = 0) -> CompiledTrees:
    """Flatten nested trees in LightGBM's ``dump_model()["tree_info"][i]["tree_structure"]`` form (a leaf is
    ``{"leaf_value": v}``; a split has ``split_feature``, ``threshold``, ``left_child``, ``right_child`` and optionally
    ``missing_type`` / ``default_left`` / ``decision_type``). Also handy for hand-made trees in tests."""
    rows: list[list[int]] = []
    vals: list[float] = []

    def alloc() -> int:
        rows.append([-1, -1, 0])
        vals.append(0.0)
        return len(rows) - 1

    def fill(node: dict[str, Any], i: int) -> None:
        if "split_feature" not in node:
            vals[i] = float(node["leaf_value"])
            return
        if node.get("decision_type", "<=") != "<=":
            raise ValueError("categorical splits are not supported (the project's features are numeric)")
        left, right = alloc(), alloc()  # side by side: right == left + 1
        flags = _MISSING_CODES[str(node.get("missing_type", "None"))] | (4 if node.get("default_left", True) else 0)
        rows[i] = [int(node["split_feature"]), left, flags]
        vals[i] = float(node["threshold"])
        fill(node["left_child"], left)
        fill(node["right_child"], right)

    roots = []
    for tree in trees:
        r = alloc()
        fill(tree, r)
        roots.append(r)
    nodes = np.asarray(rows, dtype=np.int64).reshape(-1, 3)
    scale = 1.0 / len(roots) if average and roots else 1.0
    col = lambda j: np.ascontiguousarray(nodes[:, j])  # noqa: E731
    return _make(col(0), col(1), col(2), np.asarray(vals, dtype=np.float64), np.asarray(roots, dtype=np.int64),
                 int(objective), float(sigmoid), scale, int(num_features))


def compile_booster(model: Any) -> CompiledTrees:
    """Flatten a ``lightgbm.Booster`` (or a fitted ``LGBMModel``; its ``booster_`` is used) into arrays.

    Uses the same iteration count ``booster.predict`` uses by default (``best_iteration`` when set)."""
    booster = getattr(model, "booster_", model)
    dump = booster.dump_model()
    if int(dump.get("num_tree_per_iteration", 1)) != 1 or int(dump.get("num_class", 1)) != 1:
        raise ValueError("only single-output LightGBM models (binary / regression) can be compiled")
    obj, k = _objective_code(str(dump.get("objective", "regression")))
    if any(t.get("is_linear") for t in dump["tree_info"]):
        raise ValueError("linear trees are not supported")
    return build_trees([t["tree_structure"] for t in dump["tree_info"]], obj, k, bool(dump.get("average_output")),
                       int(dump.get("max_feature_idx", -1)) + 1)


@njit(cache=True, inline="always")
def _step(trees: CompiledTrees, node: int, f: int, x: np.ndarray) -> int:
    """One split (``Tree::NumericalDecision``): the child of ``node`` that the row ``x`` goes to."""
    fval = x[f]
    fl = trees.flags[node]
    mt = fl & 3
    if np.isnan(fval):
        if mt == MISSING_NAN:
            return trees.child[node] + (0 if fl & 4 else 1)
        fval = 0.0
    if mt == MISSING_ZERO and -_K_ZERO_THRESHOLD <= fval <= _K_ZERO_THRESHOLD:
        return trees.child[node] + (0 if fl & 4 else 1)
    return trees.child[node] + (1 if fval > trees.values[node] else 0)


@njit(cache=True, inline="always")
def _four_roots(trees: CompiledTrees, t: int) -> tuple[int, int, int, int]:
    """Roots of trees ``t .. t+3``: the start of the four interleaved walks both walkers use."""
    r = trees.roots
    return r[t], r[t + 1], r[t + 2], r[t + 3]


@njit(cache=True, inline="always")
def _add_leaves(s: float, vals: np.ndarray, a: int, b: int, c: int, d: int) -> float:
    """Add four leaves' values in tree order (the order keeps the float sum identical to one tree at a time)."""
    s += vals[a]
    s += vals[b]
    s += vals[c]
    s += vals[d]
    return s


@njit(cache=True, inline="always")
def _advance(trees: CompiledTrees, node: int, f: int, x: np.ndarray) -> tuple[int, int]:
    """One exact step of a walk that is not at its leaf yet (``f`` = the node's feature, < 0 at a leaf): the next
    node and its feature; a walk at its leaf stays where it is while the other three go on."""
    if f < 0:
        return node, f
    node = _step(trees, node, f, x)
    return node, trees.feature[node]


@njit(cache=True, _nrt=False)
def predict_raw_exact(trees: CompiledTrees, x: np.ndarray) -> float:
    """Raw score of one row ``x`` by walking each tree with LightGBM's full decision rule (NaN/zero handling).

    Four trees are walked at once: each walk is a chain of dependent loads, and interleaving four chains lets the
    CPU overlap them (about 1.7x faster here). Leaf values are still added in tree order, so the sum is the same as
    one tree at a time.

    Not inlined (numba's ``inline="always"`` works on its IR): this is the rare path (a NaN or zero meets a
    missing-value rule), and inlining it, with the table-less walker, at every call site made the kernel's first
    compile take 156 s instead of 36 s (measured; CI, every fresh install and every replay worker pay it) with no
    measurable gain in speed (bench/backtest_speed.py, within its +-20 % noise).

    Compiled without numba's reference counting (``_nrt=False``, it allocates nothing): with it, the four
    interleaved walks counted references on the trees' arrays at every step and a 30-tree row took ~26 us instead of
    ~0.35 us (measured)."""
    feat, vals = trees.feature, trees.values
    s, t, n = 0.0, 0, trees.roots.size
    while t + 4 <= n:
        a, b, c, d = _four_roots(trees, t)
        fa, fb, fc, fd = feat[a], feat[b], feat[c], feat[d]
        while fa >= 0 or fb >= 0 or fc >= 0 or fd >= 0:
            a, fa = _advance(trees, a, fa, x)
            b, fb = _advance(trees, b, fb, x)
            c, fc = _advance(trees, c, fc, x)
            d, fd = _advance(trees, d, fd, x)
        s = _add_leaves(s, vals, a, b, c, d)
        t += 4
    while t < n:
        node = trees.roots[t]
        f = feat[node]
        while f >= 0:
            node = _step(trees, node, f, x)
            f = feat[node]
        s += vals[node]
        t += 1
    return s * trees.scale


@njit(cache=True, inline="always")
def _needs_exact(trees: CompiledTrees, x: np.ndarray) -> bool:
    """True when a value of ``x`` could meet a special missing-value rule (NaN with a NaN-mode split, a (near-)zero
    or NaN with a Zero-mode split): only then does the branch-free walk differ from LightGBM's decision."""
    if trees.missing == 0:
        return False
    for j in range(x.size):
        v = x[j]
        if v != v:
            return True
        if (trees.missing & 2) and -_K_ZERO_THRESHOLD <= v <= _K_ZERO_THRESHOLD:
            return True
    return False


@njit(cache=True, inline="always")
def _go(trees: CompiledTrees, node: int, x: np.ndarray) -> int:
    """One branch-free step: a split goes to ``child + (x > threshold)`` (NaN read as 0.0, LightGBM's rule for
    missing_type None); a leaf stays where it is."""
    v = x[trees.ffeature[node]]
    v = 0.0 if v != v else v
    return trees.fchild[node] + (1 if v > trees.fthresh[node] else 0)


@njit(cache=True, inline="always")
def _predict_tables(trees: CompiledTrees, x: np.ndarray) -> float:
    """Raw score from the binned tables (:func:`_tables`): one bin per feature, then per tree the sum of
    its features' bin offsets and one leaf read; leaves are added in tree order (same float as the walker). The bin
    comes from the bucket index (:func:`_buckets`), not a binary search."""
    nf = trees.t_roff.size
    thr = trees.t_thr
    contrib = trees.t_contrib
    cells = trees.t_cells
    loff = trees.t_loff
    nt = loff.size
    for t in range(nt):
        cells[t] = loff[t]
    for f in range(nf):
        lo = trees.t_foff[f]
        hi = trees.t_foff[f + 1]
        if lo == hi:
            continue  # no tree splits on this feature
        v = x[f]
        v = 0.0 if v != v else v
        # count of thresholds < v: the bucket index counts those in earlier buckets, then v's own bucket is scanned
        b = trees.t_boff[f] + _bucket(v, trees.t_bmin[f], trees.t_bscale[f], trees.t_btop[f])
        j = lo + trees.t_bidx[b]
        stop = lo + trees.t_bidx[b + 1]
        while j < stop and thr[j] < v:
            j += 1
        row = contrib[trees.t_roff[f] + j - lo]
        for t in range(nt):  # contiguous: the compiler vectorises it
            cells[t] += row[t]
    leaf = trees.t_leaf
    s = 0.0
    for t in range(nt):
        s += leaf[cells[t]]
    return s * trees.scale


@njit(cache=True, inline="always")
def predict_raw(trees: CompiledTrees, x: np.ndarray) -> float:
    """Raw score of one row ``x`` (float64, at least ``num_features`` wide). NaN handling as LightGBM.

    Each tree is walked exactly ``depth[t]`` steps on the self-looping layout (:class:`CompiledTrees`), four trees
    at a time: no data-dependent branch is left in the walk, so the CPU overlaps the four chains of loads instead of
    stalling on mispredicted "leaf yet?" tests (about 3x faster than the exact walker on the 30-tree risk model).
    Rows that could meet a NaN/Zero missing-value rule go to :func:`predict_raw_exact`. Leaf values are added in
    tree order either way, so both give the same float."""
    if _needs_exact(trees, x):
        return predict_raw_exact(trees, x)
    if trees.t_ok:
        return _predict_tables(trees, x)
    return _predict_walk(trees, x)


@njit(cache=True, _nrt=False)
def _predict_walk(trees: CompiledTrees, x: np.ndarray) -> float:
    """The branch-free walk of :func:`predict_raw` for models too big for lookup tables (not inlined: a rare path
    kept out of the kernel's hot loop and out of its compile time)."""
    vals, depth = trees.values, trees.depth
    s, t, n = 0.0, 0, trees.roots.size
    while t + 4 <= n:
        a, b, c, d = _four_roots(trees, t)
        m = max(max(depth[t], depth[t + 1]), max(depth[t + 2], depth[t + 3]))
        for _ in range(m):
            a = _go(trees, a, x)
            b = _go(trees, b, x)
            c = _go(trees, c, x)
            d = _go(trees, d, x)
        s = _add_leaves(s, vals, a, b, c, d)
        t += 4
    while t < n:
        node = trees.roots[t]
        for _ in range(depth[t]):
            node = _go(trees, node, x)
        s += vals[node]
        t += 1
    return s * trees.scale


@njit(cache=True, inline="always")
def transform(trees: CompiledTrees, raw: float) -> float:
    """Raw score -> prediction (probability for binary models, value for regressions)."""
    if trees.objective == OBJ_SIGMOID:
        return 1.0 / (1.0 + np.exp(-trees.sigmoid * raw))
    if trees.objective == OBJ_EXP:
        return np.exp(raw)
    return raw


@njit(cache=True, inline="always")
def predict(trees: CompiledTrees, x: np.ndarray) -> float:
    """Prediction of one row (see :func:`transform`)."""
    return transform(trees, predict_raw(trees, x))


@njit(cache=True, _nrt=False)
def _predict_raw_into(trees: CompiledTrees, X: np.ndarray, out: np.ndarray) -> None:
    """``out[i]`` = raw score of row ``i``. Without numba's reference counting (it allocates nothing): with it,
    every row cost twice as much in reference counts on the trees' arrays (measured: 220 -> 107 ns per row)."""
    for i in range(X.shape[0]):
        out[i] = predict_raw(trees, X[i])


def predict_raw_batch(trees: CompiledTrees, X: np.ndarray) -> np.ndarray:
    """Raw scores of every row of a 2-D float64 matrix."""
    out = np.empty(X.shape[0], dtype=np.float64)
    _predict_raw_into(trees, X, out)
    return out


def predict_batch(trees: CompiledTrees, X: np.ndarray) -> np.ndarray:
    """Predictions for a matrix (any float dtype; converted to float64 exactly)."""
    raw = predict_raw_batch(trees, np.ascontiguousarray(X, dtype=np.float64))
    if trees.objective == OBJ_SIGMOID:
        return 1.0 / (1.0 + np.exp(-trees.sigmoid * raw))
    if trees.objective == OBJ_EXP:
        return np.exp(raw)
    return raw
