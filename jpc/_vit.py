r"""A vision transformer (ViT) as a list of predictive-coding layers.

The model of Dosovitskiy et al. (ICLR 2021), "An image is worth 16x16 words", cut
into PC layers at the residual stream: a patch embedding (image to tokens), one
layer per pre-norm transformer block, and a classification head. Each hidden
activity is a `(tokens, width)` array per example, so inference moves every
token's features between blocks.
"""

import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

from ._checks import PARAM_TYPES, check_option
from ._layers import batched
from ._types import Array, Float
from ._utils import _check_dim, get_act_fn


class PatchEmbedding(eqx.Module):
    r"""Cut an image into non-overlapping patches and embed each as one token.

    A convolution with kernel size and stride `patch_size` (a linear map of each
    flattened patch) followed by a learnt position embedding:
    $z_t = W\,\mathrm{patch}_t(x) + b + p_t$ for $t = 1..T$, with
    $T = (H/P)(W/P)$ tokens.

    Called on one example: `(channels, height, width)`, or the same values
    flattened to `(channels * height * width,)` in that order (e.g. the MNIST
    rows of `jpc.datasets.load_mnist`); returns `(tokens, width)`.
    """

    conv: eqx.nn.Conv2d
    position: Float[Array, "tokens width"]
    image_shape: tuple[int, int, int] = eqx.field(static=True)

    def __init__(self, image_shape, patch_size: int, width: int, *, key: Array):
        channels, height, img_width = image_shape
        conv_key, pos_key = jr.split(key)
        self.conv = eqx.nn.Conv2d(
            channels, width, patch_size, stride=patch_size, key=conv_key
        )
        tokens = (height // patch_size) * (img_width // patch_size)
        self.position = 0.02 * jr.normal(pos_key, (tokens, width))
        self.image_shape = tuple(image_shape)

    def __call__(self, x: Array) -> Array:
        if math.prod(x.shape) != math.prod(self.image_shape):
            raise ValueError(
                f"PatchEmbedding expects one image of shape {self.image_shape} (or "
                f"{math.prod(self.image_shape)} values), got shape {x.shape}."
            )
        features = self.conv(jnp.reshape(x, self.image_shape))
        tokens = jnp.reshape(features, (features.shape[0], -1)).T
        return tokens + self.position


class TransformerBlock(eqx.Module):
    r"""A pre-norm transformer encoder block with its residual connections.

    $$h = z + \mathrm{MHA}(\mathrm{LN}_1(z)), \qquad
    f(z) = h + W_2\,\phi(W_1\,\mathrm{LN}_2(h) + b_1) + b_2,$$

    where $\mathrm{MHA}$ is `eqx.nn.MultiheadAttention` (self-attention over the
    tokens, no mask), the layer norms and the MLP act on each token and $\phi$ is
    the activation (GELU by default). Called on one example `(tokens, width)`;
    returns the same shape.
    """

    norm1: eqx.nn.LayerNorm
    attention: eqx.nn.MultiheadAttention
    norm2: eqx.nn.LayerNorm
    mlp_in: eqx.nn.Linear
    mlp_out: eqx.nn.Linear
    act_fn: Callable = eqx.field(static=True)

    def __init__(self, width: int, n_heads: int, mlp_width: int, act_fn, *, key: Array):
        attn_key, in_key, out_key = jr.split(key, 3)
        self.norm1 = eqx.nn.LayerNorm(width)
        self.attention = eqx.nn.MultiheadAttention(
            n_heads,
            width,
            use_query_bias=True,
            use_key_bias=True,
            use_value_bias=True,
            use_output_bias=True,
            key=attn_key,
        )
        self.norm2 = eqx.nn.LayerNorm(width)
        self.mlp_in = eqx.nn.Linear(width, mlp_width, key=in_key)
        self.mlp_out = eqx.nn.Linear(mlp_width, width, key=out_key)
        self.act_fn = act_fn

    def __call__(self, z: Array) -> Array:
        h = batched(self.norm1)(z)
        z = z + self.attention(h, h, h)
        h = batched(self.norm2)(z)
        mlp = jax.vmap(lambda t: self.mlp_out(self.act_fn(self.mlp_in(t))))
        return z + mlp(h)


class ClassificationHead(eqx.Module):
    r"""Layer norm on each token, mean over the tokens, then a linear map.

    $f(z) = W\,\frac{1}{T}\sum_t \mathrm{LN}(z_t) + b$: the global-average-pooling
    head of Dosovitskiy et al. (2021), used instead of a class token. Called on one
    example `(tokens, width)`; returns the logits `(n_classes,)`.
    """

    norm: eqx.nn.LayerNorm
    linear: eqx.nn.Linear

    def __init__(self, width: int, n_classes: int, *, key: Array):
        self.norm = eqx.nn.LayerNorm(width)
        self.linear = eqx.nn.Linear(width, n_classes, key=key)

    def __call__(self, z: Array) -> Array:
        return self.linear(jnp.mean(batched(self.norm)(z), axis=0))


def _image_hw(image_size) -> tuple[int, int]:
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        return image_size, image_size
    if (
        isinstance(image_size, (tuple, list))
        and len(image_size) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) for s in image_size)
    ):
        return tuple(image_size)
    raise ValueError(
        "`image_size` must be an int or a (height, width) pair of ints, got "
        f"{image_size!r}."
    )


def _check_vit_sizes(height, img_width, patch_size, width, n_heads) -> None:
    for name, value in [("image height", height), ("image width", img_width)]:
        if value % patch_size:
            raise ValueError(
                f"`patch_size` ({patch_size}) must divide the {name} ({value})."
            )
    if width % n_heads:
        raise ValueError(
            f"`n_heads` ({n_heads}) must divide `width` ({width}): each head gets "
            "width / n_heads features."
        )


def make_vit(
    key: Array,
    *,
    image_size: int | tuple[int, int] = 28,
    patch_size: int = 7,
    channels: int = 1,
    width: int = 64,
    depth: int = 2,
    n_heads: int = 4,
    mlp_ratio: int = 2,
    n_classes: int = 10,
    act_fn: str | Callable = "gelu",
    param_type: str = "sp",
) -> list[eqx.Module]:
    r"""A vision transformer (Dosovitskiy et al., ICLR 2021) as a list of PC layers.

    The `depth + 2` layers are

    1. [`jpc.PatchEmbedding`][]: image `(channels, H, W)` (or flattened) to
        `(tokens, width)` with `tokens = (H / patch_size) * (W / patch_size)`;
    2. `depth` × [`jpc.TransformerBlock`][]: `(tokens, width)` to
        `(tokens, width)`, pre-norm, residual connections inside the block;
    3. [`jpc.ClassificationHead`][]: `(tokens, width)` to `(n_classes,)` logits.

    So a supervised model has activities `[z_1, ..., z_{depth+1}, z_L]` with
    per-example shapes `(tokens, width)` and `(n_classes,)`, and works with every
    function that takes a list of layers: [`jpc.pc_energy_fn`][], the ODE and
    discrete inference of [`jpc.make_pc_step`][], [`jpc.make_bp_step`][], the
    error-based and incremental variants. Pass `skip_model=None`: the residual
    connections are already part of each block, so a skip model would add a
    second one. For unsupervised use or [`jpc.init_epc_errors`][], the layer sizes
    are `[(channels, H, W), (tokens, width), ..., (tokens, width), n_classes]`.

    The weights use Equinox's default initialisation; the position embedding is
    drawn from $\mathcal{N}(0, 0.02^2)$. There is no dropout and no class token.

    **Arguments:**

    - `key`: PRNG key for the weights.
    - `image_size`: `H = W` as an int, or `(H, W)`. Default `28` (MNIST).
    - `patch_size`: side `P` of the square patches; must divide `H` and `W`.
        Default `7` (16 tokens for a 28×28 image).
    - `channels`: image channels. Default `1`.
    - `width`: token feature size. Default `64`.
    - `depth`: number of transformer blocks. Default `2`.
    - `n_heads`: attention heads; must divide `width`. Default `4`.
    - `mlp_ratio`: hidden size of each block's MLP, in multiples of `width`.
        Default `2`.
    - `n_classes`: number of output logits. Default `10`.
    - `act_fn`: activation of the blocks' MLPs (a name for [`jpc.get_act_fn`][]
        or a function). Default `"gelu"`.
    - `param_type`: only `"sp"`. μPC and NTP (Innocenti et al., 2025) scale each
        layer's output by one scalar derived for a single weight matrix per layer
        drawn from $\mathcal{N}(0, 1)$; a transformer block holds several matrices,
        a softmax and layer norms, for which those scalings are not derived. Keep
        `param_type="sp"` in the training functions for this model too.

    **Returns:**

    A list of `depth + 2` Equinox modules.

    **Raises:**

    `ValueError` for non-positive sizes, a `patch_size` that does not divide the
    image, an `n_heads` that does not divide `width`, an unknown `act_fn`, or a
    `param_type` other than `"sp"`.
    """
    check_option("param_type", param_type, PARAM_TYPES)
    if param_type != "sp":
        raise ValueError(
            f"`param_type` must be 'sp' for `make_vit`, got {param_type!r}: the "
            "muPC and NTP scalings are derived for one weight matrix per layer, not "
            "for transformer blocks."
        )
    height, img_width = _image_hw(image_size)
    sizes = [
        ("image_size", height),
        ("image_size", img_width),
        ("patch_size", patch_size),
        ("channels", channels),
        ("width", width),
        ("depth", depth),
        ("n_heads", n_heads),
        ("mlp_ratio", mlp_ratio),
        ("n_classes", n_classes),
    ]
    for name, value in sizes:
        _check_dim(name, value)
    _check_vit_sizes(height, img_width, patch_size, width, n_heads)
    act = get_act_fn(act_fn)
    embed_key, head_key, *block_keys = jr.split(key, depth + 2)
    embed = PatchEmbedding(
        (channels, height, img_width), patch_size, width, key=embed_key
    )
    blocks = [
        TransformerBlock(width, n_heads, mlp_ratio * width, act, key=k)
        for k in block_keys
    ]
    head = ClassificationHead(width, n_classes, key=head_key)
    return [embed, *blocks, head]
