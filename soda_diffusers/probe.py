"""Classification probes on frozen features: how much a representation ``z`` knows about the category.

* :func:`linear_probe`: multinomial logistic regression on standardised features, full batch L-BFGS
  from zero weights -- a convex problem with no randomness, so the accuracy is deterministic.
* :func:`knn_probe`: k-nearest neighbours by cosine similarity with a similarity-weighted vote
  (Wu et al. 2018, as used by DINO), or a plain majority vote.

Features are ``(N, D)`` tensors or arrays; labels are any 1-d sequence of hashable values (ints,
category synsets, ...). Both return the test accuracy in [0, 1]. A test label never seen in training
counts as an error.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _features(features) -> torch.Tensor:
    features = torch.as_tensor(features).detach().float().cpu()
    if features.ndim != 2:
        raise ValueError(f"features: expected (N, D), got shape {tuple(features.shape)}")
    return features


def _labels(train_labels, test_labels) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
    """Class values, train labels as class indices, test labels as given."""
    train_labels = np.asarray(train_labels.cpu() if isinstance(train_labels, torch.Tensor) else train_labels)
    test_labels = np.asarray(test_labels.cpu() if isinstance(test_labels, torch.Tensor) else test_labels)
    classes, train_index = np.unique(train_labels, return_inverse=True)
    return classes, torch.from_numpy(train_index.reshape(-1)).long(), test_labels.reshape(-1)


def _accuracy(classes: np.ndarray, predicted_index: torch.Tensor, test_labels: np.ndarray) -> float:
    return float(np.mean(classes[predicted_index.numpy()] == test_labels))


def _check_sizes(train_features, train_index, test_features, test_labels) -> None:
    if len(train_features) != len(train_index) or len(test_features) != len(test_labels):
        raise ValueError("features and labels differ in length")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train and test features differ in width: {train_features.shape[1]} vs {test_features.shape[1]}"
        )


def linear_probe(
    train_features,
    train_labels,
    test_features,
    test_labels,
    weight_decay: float = 1e-4,
    max_iter: int = 500,
) -> float:
    """Test accuracy of a multinomial logistic regression trained on frozen features.

    Features are standardised with the training mean and standard deviation; the classifier minimises
    ``cross_entropy(x W + b, y) + weight_decay / 2 * |W|^2`` over the whole training set with L-BFGS
    (strong-Wolfe line search, at most ``max_iter`` iterations), starting from ``W = 0, b = 0``.
    """
    train_x, test_x = _features(train_features), _features(test_features)
    classes, train_y, test_labels = _labels(train_labels, test_labels)
    _check_sizes(train_x, train_y, test_x, test_labels)

    mean, std = train_x.mean(0), train_x.std(0, unbiased=False).clamp(min=1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std

    weight = torch.zeros(train_x.shape[1], len(classes), requires_grad=True)
    bias = torch.zeros(len(classes), requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(train_x @ weight + bias, train_y) + 0.5 * weight_decay * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():  # callers often evaluate under no_grad
        optimizer.step(closure)
    with torch.no_grad():
        predicted = (test_x @ weight + bias).argmax(dim=1)
    return _accuracy(classes, predicted, test_labels)


@torch.no_grad()
def knn_probe(
    train_features,
    train_labels,
    test_features,
    test_labels,
    k: int = 20,
    temperature: float | None = 0.07,
    chunk_size: int = 1024,
) -> float:
    """Test accuracy of k-nearest-neighbour classification by cosine similarity.

    Each of the ``k`` most similar training samples votes for its class with weight
    ``exp(similarity / temperature)``; ``temperature=None`` gives every vote weight 1 (majority vote,
    ties to the class that sorts first). Test samples are processed ``chunk_size`` at a time.
    """
    train_x, test_x = (
        F.normalize(_features(train_features), dim=1),
        F.normalize(_features(test_features), dim=1),
    )
    classes, train_y, test_labels = _labels(train_labels, test_labels)
    _check_sizes(train_x, train_y, test_x, test_labels)
    k = min(k, len(train_x))

    predicted = []
    for chunk in test_x.split(chunk_size):
        similarity, neighbour = (chunk @ train_x.T).topk(k, dim=1)
        weight = torch.ones_like(similarity) if temperature is None else (similarity / temperature).exp()
        votes = torch.zeros(len(chunk), len(classes)).scatter_add_(1, train_y[neighbour], weight)
        predicted.append(votes.argmax(dim=1))
    return _accuracy(classes, torch.cat(predicted), test_labels)
