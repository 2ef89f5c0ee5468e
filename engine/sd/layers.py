"""A UNet's cross-attention layers, as a per-layer word (P+ / XTI) sees them.

P+ (Voynov et al. 2023) gives a word one vector set per cross-attention layer of the UNet;
kohya's XTI files key each set by the layer's block in the original (LDM) UNet: its
`input_blocks` index (INnn), the middle block (MID), its `output_blocks` index (OUTnn).
SD 1.x and 2.x have 16 such layers:

    IN01 IN02 IN04 IN05 IN07 IN08 MID OUT03 OUT04 OUT05 OUT06 OUT07 OUT08 OUT09 OUT10 OUT11

in the order the UNet runs them (down blocks, the middle, up blocks), which is also the
keys' alphabetical order.  The mapping is computed from the UNet's config, so a smaller UNet
of the same design (the built-in test models, the demo) gets its own, fewer, layers named by
the same rule.  A layout with stacked transformer layers in one attention (SDXL's
`transformer_layers_per_block`), or block types other than diffusers' cross-attention down,
mid and up blocks, has no one mapping: it is refused (engine.sd.family decides per family).

Torch-free: the CLI reads the layers from a model's unet/config.json before it submits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from engine.errors import UserError

CROSS_DOWN, CROSS_UP, CROSS_MID = "CrossAttnDownBlock2D", "CrossAttnUpBlock2D", "UNetMidBlock2DCrossAttn"
PLAIN_BLOCKS = ("DownBlock2D", "UpBlock2D")
SD_LAYERS = ("IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID", "OUT03", "OUT04", "OUT05", "OUT06",
             "OUT07", "OUT08", "OUT09", "OUT10", "OUT11")  # SD 1.x / 2.x: kohya's XTI keys


@dataclass(frozen=True)
class Layer:
    key: str  # kohya's name: IN01 … MID … OUT11
    module: str  # diffusers' attention (Transformer2DModel) holding it, e.g. down_blocks.0.attentions.1

    @property
    def attn2(self) -> str:
        """The cross-attention module itself (the one transformer block's attn2)."""
        return f"{self.module}.transformer_blocks.0.attn2"


def is_layer_key(key) -> bool:
    """IN01 … MID … OUT11: a key of kohya's XTI layout."""
    if not isinstance(key, str):
        return False
    if key == "MID":
        return True
    for prefix in ("IN", "OUT"):
        digits = key[len(prefix):]
        if key.startswith(prefix) and len(digits) == 2 and digits.isdigit():
            return True
    return False


def layer_order(key: str) -> tuple[int, int]:
    """Sort key: the order the UNet runs its layers (input blocks, middle, output blocks)."""
    if key == "MID":
        return 1, 0
    return (0, int(key[2:])) if key.startswith("IN") else (2, int(key[3:]))


def cross_attention_layers(config: Mapping) -> tuple[Layer, ...]:
    """The UNet's cross-attention layers in execution order, from its config (a diffusers
    UNet2DConditionModel config: unet/config.json, or a loaded UNet's `.config`).  Raises
    UserError (naming what does not fit) for a layout with no one-layer-per-attention mapping."""
    downs, ups = list(config.get("down_block_types") or ()), list(config.get("up_block_types") or ())
    per_block = _per_block(config.get("layers_per_block", 2), len(downs), "layers_per_block")
    stacked = config.get("transformer_layers_per_block") or 1
    if any(n != 1 for n in _flat(stacked)):
        raise UserError("its UNet stacks several transformer layers in one attention "
                        f"(transformer_layers_per_block {stacked}), which has no one-layer-per-attention mapping")
    if config.get("dual_cross_attention") or config.get("only_cross_attention") not in (None, False):
        raise UserError("its UNet's attention is not plain cross-attention (dual or cross-only)")
    for kind in downs + ups:
        if kind not in (CROSS_DOWN, CROSS_UP, *PLAIN_BLOCKS):
            raise UserError(f"its UNet has {kind} blocks; only diffusers' CrossAttn/plain down and up blocks map")
    layers, index = [], 1  # input block 0 is conv_in
    for i, kind in enumerate(downs):
        for j in range(per_block[i]):
            if kind == CROSS_DOWN:
                layers.append(Layer(f"IN{index:02d}", f"down_blocks.{i}.attentions.{j}"))
            index += 1
        index += i < len(downs) - 1  # the downsampler is an input block of its own
    mid = config.get("mid_block_type", CROSS_MID)
    if mid == CROSS_MID:
        layers.append(Layer("MID", "mid_block.attentions.0"))
    elif mid is not None:
        raise UserError(f"its UNet's middle block is {mid}; only {CROSS_MID} maps")
    index, up_layers = 0, list(reversed(per_block))
    for i, kind in enumerate(ups):
        for j in range(up_layers[i] + 1):  # an up block has one layer more than its down block
            if kind == CROSS_UP:
                layers.append(Layer(f"OUT{index:02d}", f"up_blocks.{i}.attentions.{j}"))
            index += 1
    if not layers:
        raise UserError("its UNet has no cross-attention layer")
    return tuple(layers)


def describe_layers(keys) -> str:
    """'16 layers (IN01…OUT11)' for messages."""
    keys = list(keys)
    if not keys:
        return "no layers"
    span = keys[0] if len(keys) == 1 else f"{keys[0]}…{keys[-1]}"
    return f"{len(keys)} layer{'s' if len(keys) != 1 else ''} ({span})"


def _per_block(value, count: int, name: str) -> list[int]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count or not all(isinstance(v, int) and v >= 1 for v in values):
        raise UserError(f"its UNet's {name} {value!r} does not fit its {count} blocks")
    return values


def _flat(value) -> list:
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _flat(v)]
    return [value]
