"""Where a ViT classifier looked: Grad-CAM on the patch tokens of its last block.

For the class to explain, the score is its log-odds ``z_t - logsumexp(z_others)`` (no softmax
saturation: a probability of 0.99998 still has a gradient). With ``A`` the normalized tokens the
last block's attention reads (the output of its first LayerNorm), (N, T, D), and
``G = d score / d A``, each hidden channel gets the weight ``w_d = mean over patch tokens of
G[:, p, d]`` and each patch ``relu(sum_d w_d A[:, p, d])``: the evidence *for* the class, one value
per patch (Selvaraju et al. 2017, on tokens instead of a CNN's feature map). The LayerNorm output
is used, not the block input, because a LayerNorm's input gradient is orthogonal to its centered
input: gradient x activation there is ~0 in a pre-LN ViT. Class-specific, one backward pass,
independent of the attention kernel, and it covers heads that read the CLS token (ViT) and the
mean of the patch tokens (DINOv2).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = ["SCALE_WIDTH", "last_block", "overlay", "token_gradcam"]


def last_block(model: torch.nn.Module) -> torch.nn.Module:
    """The last transformer block of a Hugging Face ViT-style classifier.

    That is the last entry of the longest ``ModuleList`` of blocks (named ``layer`` or ``layers``,
    e.g. ``vit.layers``, ``dinov2.encoder.layer``) with ``config.num_hidden_layers`` entries.
    """
    depth = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layer", "layers"):
            if len(module) and len(module) == depth:
                return module[-1]
    raise ValueError(f"{type(model).__name__} has no ViT blocks (config.num_hidden_layers) to explain")


def token_gradcam(model: torch.nn.Module, pixel_values: torch.Tensor, target: int | torch.Tensor) -> torch.Tensor:
    """Grad-CAM maps (N, gh, gw) >= 0 of `target` class evidence per patch, gh = H // patch size.

    Args:
        model: a Hugging Face image classifier with ViT blocks (``config.patch_size``).
        pixel_values: (N, C, H, W) model input, as from `peft_deer.data.preprocess_images`.
        target: class index, or (N,) indices, whose log-odds is explained.
    """
    n, _, h, w = pixel_values.shape
    patch = int(model.config.patch_size)
    gh, gw = h // patch, w // patch
    targets = torch.as_tensor(target, device=pixel_values.device).expand(n)
    norm = next((m for m in last_block(model).modules() if isinstance(m, torch.nn.LayerNorm)), None)
    if norm is None:
        raise ValueError(f"the last block of {type(model).__name__} has no LayerNorm to explain at")
    captured: list[torch.Tensor] = []

    def capture(_module: torch.nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        tokens = out.detach().requires_grad_(True)  # a leaf: gradients even with frozen weights
        captured.append(tokens)
        return tokens

    handle = norm.register_forward_hook(capture)
    try:
        with torch.enable_grad():
            logits = model(pixel_values=pixel_values).logits.double()  # (N, K)
            chosen = logits.gather(1, targets[:, None]).squeeze(1)
            others = logits.scatter(1, targets[:, None], float("-inf")).logsumexp(dim=1)
            (grad,) = torch.autograd.grad((chosen - others).sum(), captured[0])
    finally:
        handle.remove()
    patches = slice(captured[0].shape[1] - gh * gw, None)  # CLS (and register) tokens come first
    acts, grads = captured[0].detach()[:, patches].double(), grad[:, patches].double()  # (N, P, D)
    weights = grads.mean(dim=1, keepdim=True)  # (N, 1, D)
    cam = torch.relu((weights * acts).sum(dim=-1))  # (N, P)
    return cam.reshape(n, gh, gw).float()


def overlay(
    image: Any, heatmap: Any, *, size: int = 320, alpha: float = 0.45, scale: bool = True
) -> Image.Image:
    """RGB picture of `image` (size x size) with `heatmap` (gh, gw) blended on top, jet colours, and (`scale`)
    a colour scale `SCALE_WIDTH` px wide on its right: jet from "none" (bottom, no evidence) to "max" (top).

    The heatmap is scaled to its own maximum (a map without positive evidence shows no colour) and
    upsampled bilinearly; the image (uint8 (H, W) or (H, W, 3)) is enlarged nearest-neighbour.
    """
    from matplotlib import colormaps

    base = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
    base = base.resize((size, size), Image.Resampling.NEAREST)
    cam = torch.as_tensor(np.asarray(heatmap, dtype=np.float32))[None, None]
    cam = torch.nn.functional.interpolate(cam, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    peak = float(cam.max())
    cam = (cam / peak if peak > 0 else torch.zeros_like(cam)).numpy()
    colour = colormaps["jet"](cam)[..., :3]  # (size, size, 3) in [0, 1]
    weight = alpha * cam[..., None]  # no evidence: the image shows through unchanged
    blended = (1 - weight) * np.asarray(base, dtype=np.float64) / 255.0 + weight * colour
    picture = Image.fromarray(np.clip(np.rint(blended * 255.0), 0, 255).astype(np.uint8))
    return _with_scale(picture, colormaps["jet"], alpha) if scale else picture


SCALE_WIDTH = 48  # px added on the right by the colour scale


def _with_scale(picture: Image.Image, cmap: Any, alpha: float) -> Image.Image:
    """`picture` with a vertical colour bar (as blended over mid grey, alpha at the top) and its two labels."""
    from PIL import ImageDraw

    size = picture.height
    out = Image.new("RGB", (picture.width + SCALE_WIDTH, size), (255, 255, 255))
    out.paste(picture, (0, 0))
    levels = np.linspace(1.0, 0.0, size)[:, None]  # top: the map's maximum
    bar = (1 - alpha * levels[..., None]) * 0.5 + alpha * levels[..., None] * cmap(levels)[..., :3]
    bar = np.repeat(bar, 12, axis=1)
    out.paste(Image.fromarray(np.clip(np.rint(bar * 255), 0, 255).astype(np.uint8)), (picture.width + 4, 0))
    draw = ImageDraw.Draw(out)
    draw.text((picture.width + 18, 2), "max", fill=(0, 0, 0))
    draw.text((picture.width + 18, size - 14), "none", fill=(0, 0, 0))
    return out
