"""Tiny Hugging Face models built from configs (no download), for the tests that need real module types."""

from __future__ import annotations

import transformers as T

SMALL = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2, vocab_size=64,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)


def gpt2() -> T.GPT2LMHeadModel:
    return T.GPT2LMHeadModel(T.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                          bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0,
                                          attn_pdrop=0.0))


def llama() -> T.LlamaForCausalLM:
    return T.LlamaForCausalLM(T.LlamaConfig(**SMALL, num_key_value_heads=1))


FAMILIES = {
    "gpt2": gpt2,
    "llama": llama,
    "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**SMALL, num_key_value_heads=1)),
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**SMALL, num_key_value_heads=1)),
    "gpt_neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**SMALL)),
    "bert": lambda: T.BertForMaskedLM(T.BertConfig(**SMALL)),
    "roberta": lambda: T.RobertaForMaskedLM(T.RobertaConfig(**SMALL)),
    "t5": lambda: T.T5ForConditionalGeneration(T.T5Config(d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2,
                                                          vocab_size=64, feed_forward_proj="gated-gelu")),
    "falcon": lambda: T.FalconForCausalLM(T.FalconConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                                         vocab_size=64)),
    "phi": lambda: T.PhiForCausalLM(T.PhiConfig(**SMALL)),
    "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(**SMALL)),
    "mixtral": lambda: T.MixtralForCausalLM(T.MixtralConfig(**SMALL, num_key_value_heads=1, num_local_experts=3,
                                                            num_experts_per_tok=2)),
    "qwen2_moe": lambda: T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(**SMALL, num_key_value_heads=1, num_experts=2,
                                                                num_experts_per_tok=1, moe_intermediate_size=16,
                                                                shared_expert_intermediate_size=16)),
}
