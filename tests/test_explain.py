"""The explanation heatmap (peft_deer.demo.explain): on a tiny ViT trained so that the class depends on one
region (a bright square anywhere = class 1), the map is not constant and follows the square."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_vit
from transformers import Dinov2Config, Dinov2ForImageClassification

from peft_deer.demo.explain import SCALE_WIDTH, last_block, overlay, token_gradcam

CELL = 7  # tiny_vit: 28 px, 7 px patches -> a 4 x 4 token grid


def _images(cells: torch.Tensor, present: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(N, 1, 28, 28) model inputs: dim noise, plus a bright patch-sized square at `cells` where `present`."""
    n = len(cells)
    x = torch.rand(n, 1, 28, 28, generator=gen) * 0.3
    grid = torch.arange(28) // CELL
    rows, cols = cells // 4, cells % 4
    square = (grid[None, :, None] == rows[:, None, None]) & (grid[None, None, :] == cols[:, None, None])
    x[:, 0][square & present[:, None, None]] = 1.0
    return (x - 0.5) / 0.5


@pytest.fixture(scope="module")
def square_model() -> torch.nn.Module:
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (1024,), generator=gen)
    x = _images(torch.randint(0, 16, (1024,), generator=gen), labels.bool(), gen)
    model = tiny_vit().train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(80):
        idx = torch.randint(0, 1024, (64,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(pixel_values=x[idx]).logits, labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    test_labels = torch.randint(0, 2, (256,), generator=gen)
    test_x = _images(torch.randint(0, 16, (256,), generator=gen), test_labels.bool(), gen)
    with torch.no_grad():
        accuracy = (model(pixel_values=test_x).logits.argmax(1) == test_labels).float().mean().item()
    assert accuracy > 0.95, f"the square task was not learned (accuracy {accuracy:.3f}); the test below needs it"
    return model


@pytest.mark.e2e  # trains a model, over 5 s
def test_map_follows_the_evidence(square_model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    cells = torch.arange(16)
    x = _images(cells, torch.ones(16, dtype=torch.bool), gen)
    cams = token_gradcam(square_model, x, 1)
    assert cams.shape == (16, 4, 4) and bool((cams >= 0).all())
    for cell, cam in zip(cells.tolist(), cams, strict=True):
        assert cam.std() > 0, "constant map"
        assert int(cam.flatten().argmax()) == cell, f"square at cell {cell}, map peaks at {int(cam.argmax())}"
        # most of the evidence sits on the square's patch
        assert cam.flatten()[cell] > 0.5 * cam.sum()
    # moving the square moves the map
    assert not torch.allclose(cams[0], cams[15])


@pytest.mark.e2e  # trains a model, over 5 s
def test_map_needs_a_trained_signal(square_model: torch.nn.Module) -> None:
    """The same image on the untrained model gives a different map: the map reflects what was learned."""
    x = _images(torch.tensor([5]), torch.tensor([True]), torch.Generator().manual_seed(2))
    trained = token_gradcam(square_model, x, 1)[0]
    untrained = token_gradcam(tiny_vit(seed=3), x, 1)[0]
    assert int(trained.argmax()) == 5
    assert not torch.allclose(trained / trained.max(), untrained / untrained.max().clamp_min(1e-12), atol=0.2)


def test_dinov2_layout_and_overlay() -> None:
    """DINOv2 (the main job's backbone: CLS + mean-patch head, encoder.layer) is explained too."""
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=56, patch_size=14, num_labels=2)  # fmt: skip
    torch.manual_seed(0)
    model = Dinov2ForImageClassification(config).eval()
    for p in model.parameters():  # a served model is frozen: the map must not need parameter gradients
        p.requires_grad_(False)
    assert last_block(model) is model.dinov2.encoder.layer[-1]
    cam = token_gradcam(model, torch.randn(2, 3, 56, 56), torch.tensor([0, 1]))
    assert cam.shape == (2, 4, 4) and float(cam.std()) > 0
    image = (np.arange(56 * 56).reshape(56, 56) % 256).astype(np.uint8)
    picture = overlay(image, cam[0].numpy(), size=112)
    assert picture.size == (112 + SCALE_WIDTH, 112) and picture.mode == "RGB"
    assert overlay(image, cam[0].numpy(), size=112, scale=False).size == (112, 112)
    plain = overlay(image, np.zeros((4, 4)), size=112, scale=False)  # no evidence: the image shows through
    assert np.array_equal(np.asarray(plain)[..., 0], np.asarray(plain)[..., 1])
    assert not np.array_equal(np.asarray(picture)[:, :112], np.asarray(plain))
    bar = np.asarray(picture)[:, 112 + 4 : 112 + 16].astype(int)  # the colour scale: jet red at the top, grey below
    assert bar[1, 0, 0] > bar[1, 0, 2] + 40 and abs(bar[-1, 0] - 128).max() <= 1
    with pytest.raises(ValueError, match="no ViT blocks"):
        last_block(torch.nn.Linear(2, 2))
