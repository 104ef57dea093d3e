"""transformers code for a nanochat-mole model trained with recipe pieces (layer lambdas, smear gate,
backout, value embeddings), which transformers' own NanoChat lacks.

nanochat/hf.py copies this file, unchanged, into an exported folder as modeling_nanochat_mole.py
and points config.json's auto_map at it, so that

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

loads the model with nothing of nanochat installed: the file needs only torch and transformers
(written against 5.24). It is transformers' NanoChat with the pieces added where our GPT has them
(nanochat/gpt.py, GPT._recipe_trunk); the weights of the pieces are

    model.resid_lambdas, model.x0_lambdas       (n_layer,) each: x <- r[i] x + x0[i] x0 before layer i
    model.smear_gate.weight, model.smear_lambda  x_t += lambda sigmoid(gate(x_t[:24])) x_{t-1}
    model.backout_lambda                         x -= lambda (x after layer n_layer // 2) before the final norm
    model.value_embeds.{i}.weight               per-token values added to v on layer i, gated per kv head
    model.layers.{i}.self_attn.ve_gate.weight   that gate (from the first 12 input channels)

With a cache, the smear gate needs the previous token's embedding: the forward keeps it on the
cache object with the cache length it belongs to, so generate() works; a cache this model did not
fill, or one cropped since (assisted decoding), is refused in one line. Beam search, which reorders
caches, is not supported with the smear gate on. Written and tested against transformers 5.24
(the `cache=` keyword, output capture); older 5.x releases may lack what it uses.
Not imported by nanochat itself (only read as text): importing it needs transformers.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from huggingface_hub.dataclasses import strict
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.nanochat.configuration_nanochat import NanoChatConfig
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs
from transformers.models.nanochat.modeling_nanochat import (
    ALL_ATTENTION_FUNCTIONS,
    NanoChatAttention,
    NanoChatForCausalLM,
    NanoChatModel,
    NanoChatPreTrainedModel,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

PREV_EMBEDDING = "nanochat_prev_embedding"  # the attribute the smear gate keeps on a cache


@strict
class NanoChatMoleConfig(NanoChatConfig):
    model_type = "nanochat_mole"

    layer_lambdas: bool = False
    smear_gate: bool = False
    backout: bool = False
    value_embeds: bool = False
    smear_gate_channels: int = 24
    ve_gate_channels: int = 12

    def has_value_embed(self, layer_idx: int) -> bool:
        """Alternating layers, the last one always among them (as nanochat/gpt.py)."""
        return self.value_embeds and layer_idx % 2 == (self.num_hidden_layers - 1) % 2


class NanoChatMoleAttention(NanoChatAttention):
    """NanoChat's attention, plus v + 3 sigmoid(ve_gate(x[:12])) x value embedding when given one."""

    def __init__(self, config: NanoChatMoleConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.ve_gate = nn.Linear(config.ve_gate_channels, config.num_key_value_heads, bias=False)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                value_embedding=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape)  # (B, T, H_kv, D)
        if value_embedding is not None:
            gate = 3 * torch.sigmoid(self.ve_gate(hidden_states[..., :self.ve_gate.in_features]))  # (B, T, H_kv)
            value = value + gate.unsqueeze(-1) * value_embedding.view(hidden_shape)
        value = value.transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        query, key = self.q_norm(query), self.k_norm(key)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        output, weights = attention(self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
        return self.o_proj(output.reshape(*input_shape, -1).contiguous()), weights


class NanoChatMoleModel(NanoChatModel):
    config_class = NanoChatMoleConfig

    def __init__(self, config: NanoChatMoleConfig):
        super().__init__(config)
        n_layer, width = config.num_hidden_layers, config.hidden_size
        kv_width = config.num_key_value_heads * (getattr(config, "head_dim", None) or width // config.num_attention_heads)
        for i, layer in enumerate(self.layers):
            if config.has_value_embed(i):
                layer.self_attn = NanoChatMoleAttention(config, i)
        if config.layer_lambdas:
            self.resid_lambdas = nn.Parameter(torch.ones(n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(n_layer))
        if config.smear_gate:
            self.smear_gate = nn.Linear(config.smear_gate_channels, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout:
            self.backout_lambda = nn.Parameter(torch.zeros(1))
        if config.value_embeds:
            self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(config.vocab_size, kv_width)
                                               for i in range(n_layer) if config.has_value_embed(i)})
        self.post_init()

    def _smear(self, x: torch.Tensor, cache) -> torch.Tensor:
        previous = x[:, :-1]
        if cache is not None:
            past = cache.get_seq_length()
            length, carried = getattr(cache, PREV_EMBEDDING, (0, None)) if past else (0, None)
            if past and (carried is None or length != past):
                raise ValueError(f"smear gate: this cache holds {past} tokens but the previous token's embedding it "
                                 f"carries is {'missing' if carried is None else f'from position {length - 1}'} (a "
                                 f"cache this forward did not fill, or one cropped or reordered since: beam search and "
                                 f"assisted decoding are not supported with the smear gate)")
            setattr(cache, PREV_EMBEDDING, (past + x.size(1), x[:, -1:].detach()))
            if carried is not None:
                previous = torch.cat((carried.to(x.dtype), previous), dim=1)
        start = x.size(1) - previous.size(1)
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[:, start:, :self.smear_gate.in_features]))
        return torch.cat((x[:, :start], x[:, start:] + gate * previous), dim=1)

    @merge_with_config_defaults
    @capture_outputs  # output_hidden_states / output_attentions, recorded by hooks as in NanoChatModel
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")  # as NanoChatModel.forward
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if input_ids is None and self.config.value_embeds:
            raise ValueError("value embeddings are looked up by token id: pass input_ids, not inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past).unsqueeze(0)
        mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  cache=cache, position_ids=position_ids)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)
        x = self.norm(inputs_embeds)
        if self.config.smear_gate:
            x = self._smear(x, cache)
        x0, x_backout = x, None
        for i, layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            if self.config.layer_lambdas:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = {"value_embedding": self.value_embeds[str(i)](input_ids)} if self.config.has_value_embed(i) else {}
            x = layer(x, attention_mask=mask, position_embeddings=position_embeddings, position_ids=position_ids,
                      cache=cache, **kwargs, **ve)
            if i == self.config.num_hidden_layers // 2:
                x_backout = x
        if self.config.backout:
            x = x - self.backout_lambda * x_backout
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x), cache=cache)


class NanoChatMoleForCausalLM(NanoChatForCausalLM):
    config_class = NanoChatMoleConfig

    def __init__(self, config: NanoChatMoleConfig):
        NanoChatPreTrainedModel.__init__(self, config)
        self.model = NanoChatMoleModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
