"""Expected answers computed without rayline's own model code: from the registered
artifacts, with plain torch functions, XGBoost's Booster and numpy."""

from __future__ import annotations

import io
import json

import numpy as np
import torch


def q_values(state: dict, network: dict, obs: torch.Tensor) -> torch.Tensor:
    """Q-values from a registered DQN state_dict by hand: the linear layers and ReLUs that
    network.json describes (an MLP body, then a plain or dueling head)."""
    relu = torch.nn.functional.relu
    x = obs.float().reshape(obs.shape[0], -1)
    for i in range(len(network["hidden_sizes"]) - 1):  # body: Flatten at 0, then Linear/ReLU
        x = relu(x @ state[f"body.{1 + 2 * i}.weight"].T + state[f"body.{1 + 2 * i}.bias"])

    def head(name: str) -> torch.Tensor:
        hidden = relu(x @ state[f"head.{name}.0.weight"].T + state[f"head.{name}.0.bias"])
        return hidden @ state[f"head.{name}.2.weight"].T + state[f"head.{name}.2.bias"]

    advantage = head("advantage")
    if not network["dueling"]:
        return advantage
    return head("value") + advantage - advantage.mean(dim=1, keepdim=True)


def dqn_q_values(files: dict[str, bytes], observations: list) -> np.ndarray:
    state = torch.load(io.BytesIO(files["policy.pt"]), weights_only=True)
    network = json.loads(files["network.json"])
    return q_values(state, network, torch.tensor(observations, dtype=torch.float32)).numpy()


def xgboost_probabilities(files: dict[str, bytes], rows: list[dict]) -> np.ndarray:
    """XGBoost's own Booster on the stored UBJSON, rounds up to the recorded best one."""
    import xgboost as xgb

    meta = json.loads(files["model.json"])
    booster = xgb.Booster()
    booster.load_model(bytearray(files["model.ubj"]))  # UBJSON, never pickle
    features = np.array(
        [[np.nan if row[f] is None else row[f] for f in meta["feature_names"]] for row in rows],
        dtype=np.float32,
    )
    matrix = xgb.DMatrix(features, feature_names=meta["feature_names"])
    return booster.predict(matrix, iteration_range=(0, meta["best_iteration"] + 1))


def user_knn_scores(files: dict[str, bytes], user_id: str) -> dict[str, float]:
    """Scores of a known user's unseen items from the stored npz by plain numpy: each of
    the user's k nearest neighbours adds similarity ** power x their rating."""
    meta = json.loads(files["model.json"])
    with np.load(io.BytesIO(files["model.npz"]), allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    n_users, n_items = meta["shape"]
    ratings = np.zeros((n_users, n_items))
    indptr, indices, data = arrays["seen_indptr"], arrays["seen_indices"], arrays["seen_data"]
    for u in range(n_users):
        ratings[u, indices[indptr[u] : indptr[u + 1]]] = data[indptr[u] : indptr[u + 1]]
    user = [str(u) for u in arrays["user_ids"]].index(user_id)
    k, power = meta["params"]["k"], meta["params"]["power"]
    scores = np.zeros(n_items)
    for v, sim in zip(arrays["neighbors"][user][:k], arrays["neighbor_sims"][user][:k]):
        scores += max(float(sim), 0.0) ** power * ratings[v]
    return {
        str(arrays["item_ids"][i]): float(scores[i])
        for i in range(n_items)
        if ratings[user, i] == 0
    }
