"""TNT, ViT and DeiT from one shared set of transformer layers, each built from a config."""

from .configs import TNTConfig, TransformerConfig, ViTConfig
from .layers import Attention, Block, DropPath, Mlp, PatchEmbed, compile_blocks
from .registry import (
    ModelEntry,
    PaperRef,
    check_model_config,
    create_model,
    get_entry,
    list_models,
    model_img_size,
    model_knobs,
)
from .timm_import import load_timm_state_dict
from .tnt import TNT, TNTBlock
from .vit import VisionTransformer

__all__ = [
    "TNT",
    "Attention",
    "Block",
    "DropPath",
    "Mlp",
    "ModelEntry",
    "PaperRef",
    "PatchEmbed",
    "TNTBlock",
    "TNTConfig",
    "TransformerConfig",
    "ViTConfig",
    "VisionTransformer",
    "check_model_config",
    "compile_blocks",
    "create_model",
    "get_entry",
    "list_models",
    "load_timm_state_dict",
    "model_img_size",
    "model_knobs",
]
