"""Embedded digit strips, label checks and the resumable shuffling iterator."""
import numpy as np
import pytest


from distmulti.data import check_labels, digit_strips, load_digit_images
from distmulti.errors import DataError


def test_the_bundled_digits_are_the_real_1797_images():
    images, labels = load_digit_images()
    assert images.shape == (1797, 8, 8) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() == 1.0
    assert sorted(set(labels.tolist())) == list(range(10))


def test_strips_place_k_digits_side_by_side_with_one_label_column_each():
    images, labels = load_digit_images()
    train, test = digit_strips(4, 50, 20, seed=3)
    assert train.x.shape == (50, 1, 8, 32) and train.y.shape == (50, 4)
    assert train.y.dtype == np.int32 and test.x.shape == (20, 1, 8, 32)
    for j in range(4):
        np.testing.assert_array_equal(train.x[7, 0, :, 8 * j:8 * (j + 1)],
                                      images[train.source[7, j]])
        assert train.y[7, j] == labels[train.source[7, j]]


def test_no_source_image_is_in_both_splits_and_the_split_is_seeded():
    train, test = digit_strips(3, 3000, 1000, seed=0)
    assert not set(train.source.ravel()) & set(test.source.ravel())
    again, _ = digit_strips(3, 3000, 1000, seed=0)
    other, _ = digit_strips(3, 3000, 1000, seed=1)
    np.testing.assert_array_equal(train.x, again.x)
    assert not np.array_equal(train.source, other.source)


@pytest.mark.parametrize('y,message', [
    (np.zeros((5, 2), np.int32), 'the labels have 2 columns but the model has 3 heads'),
    (np.zeros(5, np.int32), 'shape (5,) instead of (N, K)'),
    (np.zeros((5, 3), np.float32), 'labels must be integers, got dtype float32'),
    (np.array([[0, 1, 2], [0, 10, 1]], np.int32),
     'head1 label 10 at row 1 is outside [0, 10) (10 classes); use -1 to ignore'),
    (np.array([[0, 1, -2]], np.int32), 'head2 label -2 at row 0 is outside'),
])
def test_bad_labels_get_a_clear_error(y, message):
    with pytest.raises(DataError) as info:
        check_labels(y, [10, 10, 10], 'training data')
    assert message in str(info.value) and str(info.value).startswith('training data: ')


def test_ignored_labels_are_allowed():
    check_labels(np.array([[-1, 9, 0], [3, -1, -1]], np.int32), [10, 10, 2], 'data')
