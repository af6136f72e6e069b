import numpy as np
import pytest
import torch

from soda_diffusers.probe import knn_probe, linear_probe

SYNSETS = np.array(["02691156", "02958343", "03001627", "04256520"])


def clusters(n_per_class: int, seed: int, dim: int = 64, spread: float = 1.0):
    """Gaussian clusters around well separated random centres, labelled by category synset."""
    centres = 5 * torch.randn(len(SYNSETS), dim, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(seed)
    labels = np.repeat(np.arange(len(SYNSETS)), n_per_class)
    features = centres[labels] + spread * torch.randn(len(labels), dim, generator=generator)
    return features, SYNSETS[labels]


def test_probes_separate_separable_features_perfectly():
    train_x, train_y = clusters(750, seed=1)  # 3,000 training samples
    test_x, test_y = clusters(250, seed=2)
    assert linear_probe(train_x, train_y, test_x, test_y) == 1.0
    assert knn_probe(train_x, train_y, test_x, test_y, k=20) == 1.0
    assert knn_probe(train_x, train_y, test_x, test_y, k=20, temperature=None) == 1.0


def test_probes_stay_at_chance_without_information():
    generator = torch.Generator().manual_seed(3)
    train_x, test_x = torch.randn(2000, 32, generator=generator), torch.randn(2000, 32, generator=generator)
    train_y = torch.randint(0, 5, (2000,), generator=generator)
    test_y = train_y[torch.randperm(2000, generator=generator)]  # shuffled: no relation to the features
    # chance is 1/5; the standard deviation of the accuracy over 2,000 test samples is 0.009
    assert abs(linear_probe(train_x, train_y, test_x, test_y) - 0.2) < 0.05
    assert abs(knn_probe(train_x, train_y, test_x, test_y) - 0.2) < 0.05


def test_linear_probe_is_deterministic_and_works_under_no_grad():
    train_x, train_y = clusters(100, seed=4, spread=15.0)  # overlapping clusters: accuracy below 1
    test_x, test_y = clusters(100, seed=5, spread=15.0)
    first = linear_probe(train_x, train_y, test_x, test_y)
    with torch.no_grad():
        second = linear_probe(train_x.numpy(), list(train_y), test_x.numpy(), list(test_y))
    assert first == second
    assert 0.5 < first < 1.0


def test_linear_probe_counts_unseen_test_classes_as_errors():
    train_x, train_y = clusters(50, seed=6)
    test_x, test_y = clusters(50, seed=7)
    test_y = np.where(test_y == SYNSETS[0], "unseen", test_y)
    assert linear_probe(train_x, train_y, test_x, test_y) == pytest.approx(0.75)


def test_knn_weighted_and_majority_votes_by_hand():
    # test point at angle 0: one class-0 neighbour at angle 0 (cosine 1), two class-1 neighbours at
    # +-60 degrees (cosine 0.5) and a far class-0 point that k=3 excludes
    angles = np.radians([0.0, 60.0, -60.0, 180.0])
    train_x = torch.tensor(np.stack([np.cos(angles), np.sin(angles)], axis=1), dtype=torch.float32)
    train_y = [0, 1, 1, 0]
    test_x = torch.tensor([[2.0, 0.0]])  # cosine similarity ignores the norm
    assert knn_probe(train_x, train_y, test_x, [1], k=3, temperature=None) == 1.0  # 2 votes to 1
    # exp(1 / 0.07) > 2 exp(0.5 / 0.07)
    assert knn_probe(train_x, train_y, test_x, [0], k=3, temperature=0.07) == 1.0
    assert knn_probe(train_x, train_y, test_x, [0], k=1, temperature=None) == 1.0
