"""Image layers (channels-last) against finite differences in float64, and against
direct loops written from the definitions."""

import numpy as np
import pytest
from gradcheck import bind, check_layer

from downpour.common.errors import ConfigError
from downpour.common.nn.conv import AvgPool2D, Conv2D, Flatten, MaxPool2D
from downpour.common.nn.layers import BatchNorm


def reference_conv(x, W, b, k, stride, lo, hi):
    """The convolution by its definition, one output pixel at a time: x (B, H, W, C)."""
    B, H, Wd, C = x.shape
    xp = np.pad(x, ((0, 0), (lo, hi), (lo, hi), (0, 0)))
    Wk = W.reshape(k, k, C, -1)
    OH, OW = (H + lo + hi - k) // stride + 1, (Wd + lo + hi - k) // stride + 1
    y = np.empty((B, OH, OW, Wk.shape[-1]))
    for i in range(OH):
        for j in range(OW):
            patch = xp[:, i * stride:i * stride + k, j * stride:j * stride + k, :]
            y[:, i, j] = np.einsum("bhwc,hwco->bo", patch, Wk) + b
    return y


CONVS = [  # (H, W, C, channels, kernel, stride, padding)
    (5, 5, 1, 2, 3, 1, 0),
    (6, 5, 2, 3, 3, 2, 0),
    (5, 6, 2, 2, 3, 1, 1),
    (4, 5, 3, 2, 2, 1, "same"),        # even kernel: the extra zero row/column after
    (7, 7, 2, 2, 3, 3, 2),
    (5, 4, 2, 3, 1, 1, 0),
]


@pytest.mark.parametrize("H,W,C,channels,kernel,stride,padding", CONVS)
def test_conv_gradients_and_values(H, W, C, channels, kernel, stride, padding):
    rng = np.random.default_rng(H * W + C + kernel)
    layer = Conv2D((H, W, C), channels, kernel, stride, padding)
    x = rng.standard_normal((2, H, W, C))
    check_layer(layer, x, True, rng)
    lo, hi = layer.pad
    assert np.allclose(layer.forward(x), reference_conv(x, layer.W, layer.b, kernel, stride, lo, hi))
    assert layer.forward(x).shape[1:] == layer.out_shape
    if padding == "same":
        assert layer.out_shape == (H, W, channels)


def test_conv_first_layer_skips_input_gradient():
    layer = Conv2D((4, 4, 1), 2, 3)
    layer.need_dx = False
    bind(layer, np.random.default_rng(0))
    y = layer.forward(np.ones((3, 4, 4, 1)))
    assert layer.backward(np.ones_like(y)) is None and np.all(layer.db == 3 * 4)


@pytest.mark.parametrize("cls", [MaxPool2D, AvgPool2D])
@pytest.mark.parametrize("H,W,k", [(4, 4, 2), (5, 7, 2), (7, 6, 3), (3, 3, 3)])
def test_pool_gradients_and_values(cls, H, W, k):
    rng = np.random.default_rng(H * W * k)
    layer = cls((H, W, 2), k)
    x = rng.standard_normal((3, H, W, 2))
    dx = check_layer(layer, x, True, rng)
    OH, OW = H // k, W // k                                    # odd sizes floor
    assert layer.out_shape == (OH, OW, 2)
    blocks = x[:, :OH * k, :OW * k].reshape(3, OH, k, OW, k, 2)
    expected = blocks.max(axis=(2, 4)) if cls is MaxPool2D else blocks.mean(axis=(2, 4))
    assert np.allclose(layer.forward(x), expected)
    assert np.all(dx[:, OH * k:] == 0) and np.all(dx[:, :, OW * k:] == 0)


def test_maxpool_ties_send_the_gradient_to_the_first_maximum():
    layer = MaxPool2D((2, 2, 1), 2)
    layer.forward(np.zeros((1, 2, 2, 1)))
    dx = layer.backward(np.ones((1, 1, 1, 1)))
    assert dx[0, :, :, 0].tolist() == [[1, 0], [0, 0]]


def test_flatten_round_trip():
    layer = Flatten((2, 3, 4))
    x = np.arange(48.0).reshape(2, 2, 3, 4)
    assert layer.out_shape == (24,) and np.array_equal(layer.forward(x), x.reshape(2, 24))
    assert np.array_equal(layer.backward(x.reshape(2, 24)), x)


@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_after_a_convolution_is_per_channel(train):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4, 3, 2)) * [1.0, 3.0] + [2.0, -1.0]
    check_layer(BatchNorm(2), x, train, rng)
    layer = BatchNorm(2)
    bind(layer, rng)
    layer.gamma[:], layer.beta[:] = 1, 0
    y = layer.forward(x, train=True)
    assert np.allclose(y.mean(axis=(0, 1, 2)), 0) and np.allclose(y.var(axis=(0, 1, 2)), 1, atol=1e-3)


@pytest.mark.parametrize("make, message", [
    (lambda: Conv2D((3, 3, 1), 2, 5), "5x5 kernel does not fit images 1,3,3"),
    (lambda: Conv2D((8, 8, 1), 2, 3, 2, "same"), "'same' padding needs stride 1"),
    (lambda: Conv2D((28,), 2, 3), "needs images"),
    (lambda: MaxPool2D((3, 5, 1), 4), "4x4 window does not fit"),
    (lambda: AvgPool2D((28, 28), 2), "needs images"),
])
def test_shape_errors_are_config_errors(make, message):
    with pytest.raises(ConfigError, match=message):
        make()
