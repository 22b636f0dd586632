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

    @property
    def n_trees(self) -> int:
        return int(self.roots.size)


def empty_trees(num_features: int = 0) -> CompiledTrees:
    """A model with no trees (raw score 0). The kernel always receives a CompiledTrees, plus a 'use' flag: one
    signature, one compilation, whether or not the real model exists."""
    i = np.zeros(0, dtype=np.int64)
    return CompiledTrees(i, i.copy(), i.copy(), np.zeros(0, dtype=np.float64), i.copy(), OBJ_IDENTITY, 1.0, 1.0,
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
    return CompiledTrees(feature=col(0), child=col(1), flags=col(2), values=np.asarray(vals, dtype=np.float64),
                         roots=np.asarray(roots, dtype=np.int64), objective=int(objective), sigmoid=float(sigmoid),
                         scale=scale, num_features=int(num_features))


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
def predict_raw(trees: CompiledTrees, x: np.ndarray) -> float:
    """Raw score of one row ``x`` (float64, at least ``num_features`` wide). NaN handling as LightGBM.

    Four trees are walked at once: each walk is a chain of dependent loads, and interleaving four chains lets the
    CPU overlap them (about 1.7x faster here). Leaf values are still added in tree order, so the sum is the same as
    one tree at a time."""
    feat = trees.feature
    vals = trees.values
    n = trees.roots.size
    s = 0.0
    t = 0
    while t + 4 <= n:
        a = trees.roots[t]
        b = trees.roots[t + 1]
        c = trees.roots[t + 2]
        d = trees.roots[t + 3]
        fa = feat[a]
        fb = feat[b]
        fc = feat[c]
        fd = feat[d]
        while fa >= 0 or fb >= 0 or fc >= 0 or fd >= 0:
            if fa >= 0:
                a = _step(trees, a, fa, x)
                fa = feat[a]
            if fb >= 0:
                b = _step(trees, b, fb, x)
                fb = feat[b]
            if fc >= 0:
                c = _step(trees, c, fc, x)
                fc = feat[c]
            if fd >= 0:
                d = _step(trees, d, fd, x)
                fd = feat[d]
        s += vals[a]
        s += vals[b]
        s += vals[c]
        s += vals[d]
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


@njit(cache=True)
def predict_raw_batch(trees: CompiledTrees, X: np.ndarray) -> np.ndarray:
    """Raw scores of every row of a 2-D float64 matrix."""
    out = np.empty(X.shape[0], dtype=np.float64)
    for i in range(X.shape[0]):
        out[i] = predict_raw(trees, X[i])
    return out


def predict_batch(trees: CompiledTrees, X: np.ndarray) -> np.ndarray:
    """Predictions for a matrix (any float dtype; converted to float64 exactly)."""
    raw = predict_raw_batch(trees, np.ascontiguousarray(X, dtype=np.float64))
    if trees.objective == OBJ_SIGMOID:
        return 1.0 / (1.0 + np.exp(-trees.sigmoid * raw))
    if trees.objective == OBJ_EXP:
        return np.exp(raw)
    return raw
