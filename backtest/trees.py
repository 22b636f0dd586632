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

    Nodes of all trees live in one global numbering. A child index ``>= 0`` is an internal node; a child ``< 0``
    encodes the leaf ``-child - 1`` (an index into ``leaf_value``). ``roots[t]`` is the root of tree ``t`` (itself a
    leaf code for single-leaf trees).
    """

    feature: np.ndarray  # int64[n_nodes] split feature index
    threshold: np.ndarray  # float64[n_nodes]
    missing: np.ndarray  # int64[n_nodes] MISSING_* code
    default_left: np.ndarray  # int64[n_nodes] 1 = default child is left
    left: np.ndarray  # int64[n_nodes]
    right: np.ndarray  # int64[n_nodes]
    leaf_value: np.ndarray  # float64[n_leaves]
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
    f = np.zeros(0, dtype=np.float64)
    return CompiledTrees(i, f, i.copy(), i.copy(), i.copy(), i.copy(), f.copy(), i.copy(), OBJ_IDENTITY, 1.0, 1.0,
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


def compile_booster(model: Any) -> CompiledTrees:
    """Flatten a ``lightgbm.Booster`` (or a fitted ``LGBMModel``; its ``booster_`` is used) into arrays.

    Uses the same iteration count ``booster.predict`` uses by default (``best_iteration`` when set)."""
    booster = getattr(model, "booster_", model)
    dump = booster.dump_model()
    if int(dump.get("num_tree_per_iteration", 1)) != 1 or int(dump.get("num_class", 1)) != 1:
        raise ValueError("only single-output LightGBM models (binary / regression) can be compiled")
    obj, k = _objective_code(str(dump.get("objective", "regression")))
    feat: list[int] = []
    thr: list[float] = []
    miss: list[int] = []
    dleft: list[int] = []
    left: list[int] = []
    right: list[int] = []
    leaves: list[float] = []
    roots: list[int] = []

    def walk(node: dict[str, Any]) -> int:
        if "leaf_value" in node and "split_feature" not in node:
            leaves.append(float(node["leaf_value"]))
            return -len(leaves)  # leaf k -> code -(k + 1)
        if node.get("decision_type", "<=") != "<=":
            raise ValueError("categorical splits are not supported (the project's features are numeric)")
        idx = len(feat)
        feat.append(int(node["split_feature"]))
        thr.append(float(node["threshold"]))
        miss.append(_MISSING_CODES[str(node.get("missing_type", "None"))])
        dleft.append(1 if node.get("default_left", True) else 0)
        left.append(0)
        right.append(0)
        left[idx] = walk(node["left_child"])
        right[idx] = walk(node["right_child"])
        return idx

    for tree in dump["tree_info"]:
        if tree.get("is_linear"):
            raise ValueError("linear trees are not supported")
        roots.append(walk(tree["tree_structure"]))
    n_trees = len(roots)
    scale = 1.0 / n_trees if dump.get("average_output") and n_trees else 1.0
    i64 = lambda a: np.asarray(a, dtype=np.int64)  # noqa: E731
    return CompiledTrees(
        feature=i64(feat), threshold=np.asarray(thr, dtype=np.float64), missing=i64(miss), default_left=i64(dleft),
        left=i64(left), right=i64(right), leaf_value=np.asarray(leaves, dtype=np.float64), roots=i64(roots),
        objective=obj, sigmoid=k, scale=scale, num_features=int(dump.get("max_feature_idx", -1)) + 1,
    )


@njit(cache=True, inline="always")
def predict_raw(trees: CompiledTrees, x: np.ndarray) -> float:
    """Raw score of one row ``x`` (float64, at least ``num_features`` wide). NaN handling as LightGBM."""
    s = 0.0
    for t in range(trees.roots.size):
        node = trees.roots[t]
        while node >= 0:
            fval = x[trees.feature[node]]
            mt = trees.missing[node]
            if np.isnan(fval) and mt != MISSING_NAN:
                fval = 0.0
            if (mt == MISSING_ZERO and -_K_ZERO_THRESHOLD <= fval <= _K_ZERO_THRESHOLD) or (
                mt == MISSING_NAN and np.isnan(fval)
            ):
                node = trees.left[node] if trees.default_left[node] == 1 else trees.right[node]
            elif fval <= trees.threshold[node]:
                node = trees.left[node]
            else:
                node = trees.right[node]
        s += trees.leaf_value[-node - 1]
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


@njit(cache=True, inline="always")
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
