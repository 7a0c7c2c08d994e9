"""Flax NNX decoder LMs (Qwen2, Qwen3, Llama, Qwen2.5-VL) and Hugging Face checkpoint I/O."""
from dream_r_jax.models.config import ModelConfig, RopeScaling, VisionConfig
from dream_r_jax.models.hf import config_from_hf, config_to_hf, load_pretrained, save_pretrained
from dream_r_jax.models.kv_cache import KVCache
from dream_r_jax.models.model import Transformer

__all__ = [
    "ModelConfig", "RopeScaling", "VisionConfig", "KVCache", "Transformer", "load_pretrained",
    "save_pretrained", "config_from_hf", "config_to_hf",
]
