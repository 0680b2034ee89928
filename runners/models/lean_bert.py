"""A leaner forward pass for BERT encoders on a CPU: the same arithmetic in fewer operations.

A short text's pass through all-MiniLM-L6-v2 on 2 cores is not all arithmetic: transformers'
BertModel spends ~20 % of it in Python and in operations around the matrix products (three
projections where one fused product does, attention-mask construction, the attention interface's
dispatch, a pooler whose output a sentence-transformers model throws away). This forward runs each
layer as one fused QKV product, scaled_dot_product_attention (no mask at all for one unpadded text),
the output product and the layer's own LayerNorm and activation modules, on the model's own weights
(only the fused QKV matrix is new: 3 x hidden x hidden floats a layer). One 13-token text: 6.7 against
8.5 ms; a batch of 16 mixed texts: 3-6 % faster; outputs within 1e-5 of transformers'
(docs/performance.md, "A lone query against the forward pass").

It is installed per BertModel instance (`install`), on a CPU, for transformers' own BertModel built
of its own modules (not a model's own subclass or code), absolute position embeddings, encoders
only; any call it does not cover (gradients, a training module, inputs_embeds, position ids, hidden
states or attentions asked for, a cache) goes to transformers' own forward.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("embed_rerank.models")
_SET_ASIDE = ("return_dict",)  # keyword arguments that change nothing here
_STOCK = ("transformers.models.bert.", "transformers.activations", "torch.nn.")  # modules computed as is


def eligible(model: Any) -> bool:
    """A transformers BertModel on a CPU that this forward computes exactly."""
    try:
        from transformers.models.bert.modeling_bert import BertModel
    except ImportError:  # pragma: no cover - transformers always has BERT
        return False
    if type(model) is not BertModel or getattr(model, "_lean_forward", False):
        return False  # a model's own subclass (its own code) may compute anything: left as it is
    if any(not type(m).__module__.startswith(_STOCK) for m in model.modules()):
        return False  # a module swapped for another (custom attention, adapters)
    config = model.config
    if config.is_decoder or getattr(config, "add_cross_attention", False):
        return False
    if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
        return False
    try:
        device = next(model.parameters()).device
    except StopIteration:
        return False
    return device.type == "cpu" and config.hidden_size % config.num_attention_heads == 0


def install(model: Any, pooled: bool) -> bool:
    """Give `model` (a BertModel instance) the lean forward; `pooled`: compute its pooler output (a
    classification head reads it; a sentence-transformers embedder does not). False when not eligible."""
    if not eligible(model):
        return False
    import torch
    import torch.nn.functional as F
    from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

    config = model.config
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    emb = model.embeddings
    layers = []
    for layer in model.encoder.layer:
        attention = layer.attention
        q, k, v = attention.self.query, attention.self.key, attention.self.value
        qkv_weight = torch.cat([q.weight, k.weight, v.weight]).detach().t().contiguous()
        qkv_bias = torch.cat([q.bias, k.bias, v.bias]).detach().contiguous()
        layers.append((qkv_weight, qkv_bias, attention.output.dense, attention.output.LayerNorm,
                       layer.intermediate.dense, layer.intermediate.intermediate_act_fn,
                       layer.output.dense, layer.output.LayerNorm))
    pooler = model.pooler if pooled else None
    original = model.forward

    def lean(input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
        batch, width = input_ids.shape
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = emb.word_embeddings(input_ids) + emb.token_type_embeddings(token_type_ids)
        x = emb.LayerNorm(x + emb.position_embeddings.weight[:width])
        x = x.reshape(batch * width, -1)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.bool()[:, None, None, :]
        for qkv_w, qkv_b, out_dense, out_norm, up, act, down, norm in layers:
            qkv = torch.addmm(qkv_b, x, qkv_w).view(batch, width, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
            context = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask)
            context = context.transpose(1, 2).reshape(batch * width, heads * head_dim)
            x = out_norm(out_dense(context) + x)
            x = norm(down(act(up(x))) + x)
        hidden = x.view(batch, width, -1)
        return hidden, (pooler(hidden) if pooler is not None else None)

    def forward(input_ids: Any = None, attention_mask: Any = None, token_type_ids: Any = None, *args: Any,
                **kwargs: Any) -> Any:
        covered = (
            not args and input_ids is not None and input_ids.dim() == 2 and not model.training
            and (torch.is_inference_mode_enabled() or not torch.is_grad_enabled())
            and input_ids.shape[1] <= emb.position_embeddings.num_embeddings
            and all(value is None or value is False for key, value in kwargs.items() if key not in _SET_ASIDE)
        )
        if not covered:
            return original(input_ids, attention_mask, token_type_ids, *args, **kwargs)
        hidden, pooled_output = lean(input_ids, attention_mask, token_type_ids)
        if kwargs.get("return_dict") is False:
            return (hidden, pooled_output) if pooled_output is not None else (hidden,)
        return BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=hidden, pooler_output=pooled_output)

    model.forward = forward
    model._lean_forward = True
    model._lean_pooled = pooler is not None
    return True


def install_all(root: Any) -> int:
    """The lean forward for every eligible BertModel under `root` (a replica's torch module); a BERT
    that a sentence-transformers Transformer module wraps skips its pooler. How many were installed."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return 0
    if not isinstance(root, torch.nn.Module):
        return 0
    wrapped_by_st = {id(getattr(m, "auto_model", None)) for m in root.modules()
                     if type(m).__module__.startswith("sentence_transformers")}
    done = 0
    for module in list(root.modules()):
        if eligible(module):
            done += install(module, pooled=id(module) not in wrapped_by_st and module.pooler is not None)
    if done:
        log.debug("lean BERT forward installed on %d encoder(s)", done)
    return done
