"""The demo's data: fixed splits, the document-level split of the text, shifted digits."""

from __future__ import annotations

import numpy as np
import pytest

from matta.demo import data
from matta.errors import InputError


def test_digits_split_is_stratified_fixed_and_covers_every_image():
    a, b = data.digits(), data.digits()
    assert len(a.x_train) + len(a.x_test) == 1797
    np.testing.assert_array_equal(a.x_test, b.x_test)  # the split does not depend on anything random
    np.testing.assert_array_equal(a.y_train, b.y_train)
    assert a.x_train.dtype == np.float32 and 0.0 <= a.x_train.min() and a.x_train.max() <= 1.0
    # Stratified: every class holds out ~30 % of its images.
    for c in range(10):
        held, total = np.sum(a.y_test == c), np.sum(a.y_test == c) + np.sum(a.y_train == c)
        assert held == round(0.3 * total)


def test_shifted_digits_are_a_transfer_set_of_the_training_images_only():
    plain, aug = data.digits(), data.digits(shifts=1)
    assert len(aug.x_train) == 9 * len(plain.x_train)
    np.testing.assert_array_equal(aug.x_train[: len(plain.x_train)], plain.x_train)
    np.testing.assert_array_equal(aug.x_test, plain.x_test)  # held-out images are never shifted
    np.testing.assert_array_equal(aug.y_train, np.tile(plain.y_train, 9))


def test_shift_moves_pixels_and_blanks_the_edge():
    img = np.arange(64, dtype=np.float32).reshape(1, 64)
    right = data.shifted(img, 0, 1).reshape(8, 8)
    np.testing.assert_array_equal(right[:, 1:], img.reshape(8, 8)[:, :-1])
    assert (right[:, 0] == 0).all()
    down_left = data.shifted(img, 1, -1).reshape(8, 8)
    np.testing.assert_array_equal(down_left[1:, :-1], img.reshape(8, 8)[:-1, 1:])


def test_topic_split_is_by_document_disjoint_and_large_enough():
    from pydoc_data.topics import topics

    train, test = data.topic_split(dict(topics), 0.12)
    assert set(train).isdisjoint(test) and set(train) | set(test) == set(topics)
    held = sum(len(topics[n]) for n in test)
    assert held >= 0.12 * sum(len(v) for v in topics.values())
    assert data.topic_split(dict(topics), 0.12) == (train, test)
    with pytest.raises(InputError):
        data.topic_split(dict(topics), 1.5)


def test_text_windows_are_next_token_pairs_and_held_out_text_is_unseen():
    ds = data.text(seq_len=32)
    assert ds.x_train.shape[1] == ds.x_test.shape[1] == 32
    np.testing.assert_array_equal(ds.x_train[:, 1:], ds.y_train[:, :-1])  # y is x moved by one token
    np.testing.assert_array_equal(ds.x_test[1:, 0], ds.y_test[:-1, -1])  # held-out windows tile the text
    assert ds.x_train.max() < len(data.VOCAB) and ds.info["unknown_chars_share"] < 0.01
    # A long held-out passage never occurs in the training text.
    train_text = data.decode(np.concatenate([ds.x_train[::2].ravel()]))
    probe = data.decode(ds.x_test[len(ds.x_test) // 2])
    assert probe not in train_text
    assert 0.1 < ds.info["test_chars"] / (ds.info["test_chars"] + ds.info["train_chars"]) < 0.3


def test_encode_decode_round_trip_and_unknown_characters():
    s = "def f(x):\n    return {x: 1}  # ok"
    assert data.decode(data.encode(s)) == s
    assert data.encode("é").tolist() == [0]
    assert len(data.VOCAB) == 97


def test_fingerprint_sees_content_shape_and_dtype():
    a = np.arange(6)
    assert data.fingerprint(a) == data.fingerprint(a.copy())
    assert data.fingerprint(a) != data.fingerprint(a.reshape(2, 3))
    assert data.fingerprint(a) != data.fingerprint(a.astype(np.int32))
    assert data.fingerprint(a) != data.fingerprint(a + 1)
