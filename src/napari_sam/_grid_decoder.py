"""SAM's mask decoder for many single-point prompts on one image, without repeated work.

transformers' ``SamModel`` decodes N prompts by copying the image embedding N times and
running every projection on every copy. For a grid of points most of that work is the
same for all prompts or can be reassociated around the few prompt tokens:

* In the first two-way block the image side is still the shared embedding: its key,
  value and query projections are computed once for the whole batch.
* Attention between T prompt tokens (T = 7 here) and S = 4096 image tokens is computed
  with the projection folded into the small side: ``(x W_k^T)·q = x·(W_k q)`` and
  ``softmax(.)·(x W_v^T) = (softmax(.)·x) W_v^T``, so an image-side projection of
  S x C x C/2 becomes products with h*T = 56 columns.
* The output upsampling (the decoder's most expensive step per prompt) runs only for
  prompts with at least one candidate above the caller's predicted-IoU threshold, since
  the IoU head reads only the tokens.

The arithmetic is the same function as transformers' decoder (weights are read from the
loaded ``SamModel``); results agree to float rounding (``tests/test_everything.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
    """(B, N, I) -> (B, h, N, I/h)."""
    b, n, i = x.shape
    return x.reshape(b, n, h, i // h).transpose(1, 2)


def _tokens_to_image(att, q_tokens, k_image, v_image, shared: bool):
    """SamAttention(query=tokens, key=image, value=image) -> (N, T, C)."""
    h = att.num_attention_heads
    q = _heads(att.q_proj(q_tokens), h)  # (N, h, T, d)
    n, _, t, d = q.shape
    if shared:  # image side identical for all prompts: project it once
        k = _heads(att.k_proj(k_image), h)  # (1, h, S, d)
        v = _heads(att.v_proj(v_image), h)
        probs = torch.softmax((q @ k.transpose(-1, -2)) * att.scaling, dim=-1)  # (N, h, T, S)
        out = probs @ v  # (N, h, T, d)
    else:
        c = k_image.shape[-1]
        wk = att.k_proj.weight.reshape(h, d, c)
        wv = att.v_proj.weight.reshape(h, d, c)
        folded = torch.einsum("nhtd,hdc->nhtc", q, wk).reshape(n, h * t, c)
        # q·b_k is constant along the image axis: softmax ignores it.
        logits = torch.bmm(folded, k_image.transpose(1, 2)) * att.scaling  # (N, hT, S)
        probs = torch.softmax(logits, dim=-1)
        ctx = torch.bmm(probs, v_image).reshape(n, h, t, c)  # (N, h, T, C)
        # rows of probs sum to 1, so the value bias passes through unchanged
        out = torch.einsum("nhtc,hdc->nhtd", ctx, wv) + att.v_proj.bias.reshape(1, h, 1, d)
    out = out.transpose(1, 2).reshape(n, t, h * d)
    return att.out_proj(out)


def _image_to_tokens(att, q_image, k_tokens, v_tokens, shared: bool):
    """SamAttention(query=image, key=tokens, value=tokens) -> (N, S, C)."""
    h = att.num_attention_heads
    k = _heads(att.k_proj(k_tokens), h)  # (N, h, T, d)
    v = _heads(att.v_proj(v_tokens), h)
    n, _, t, d = k.shape
    c = att.out_proj.weight.shape[0]
    wo = att.out_proj.weight.reshape(c, h, d).permute(1, 2, 0)  # (h, d, C)
    vo = torch.einsum("nhtd,hdc->nhtc", v, wo).reshape(n, h * t, c)  # values already through out_proj
    if shared:
        q = _heads(att.q_proj(q_image), h)  # (1, h, S, d)
        logits = (q @ k.transpose(-1, -2)) * att.scaling  # (N, h, S, T)
        s = logits.shape[2]
        probs = torch.softmax(logits, dim=-1).transpose(1, 2).reshape(n, s, h * t)
    else:
        wq = att.q_proj.weight.reshape(h, d, c)
        folded = torch.einsum("nhtd,hdc->nhtc", k, wq).reshape(n, h * t, c)
        bias = torch.einsum("nhtd,hd->nht", k, att.q_proj.bias.reshape(h, d)).reshape(n, 1, h * t)
        logits = (torch.bmm(q_image, folded.transpose(1, 2)) + bias) * att.scaling  # (N, S, hT)
        s = logits.shape[1]
        probs = torch.softmax(logits.reshape(n, s, h, t), dim=-1).reshape(n, s, h * t)
    return torch.bmm(probs, vo) + att.out_proj.bias


def decode_points(model, features: torch.Tensor, coords_xy: torch.Tensor, *, multimask: bool = True,
                  min_score: float | None = None):
    """Decode N single-point prompts (model-frame ``(x, y)``) on one image embedding.

    Parameters
    ----------
    model : transformers.SamModel
    features : (1, C, h, w) image embedding on the model's device and dtype
    coords_xy : (N, 2) float32, points in the model's input frame (before the 0.5 shift)

    Returns
    -------
    low_res : (M, L, L) float32 logits of the candidates whose predicted IoU is above
        ``min_score`` (all with None), scores (M,), prompt index (M,) -- as tensors.
    """
    n = coords_xy.shape[0]
    device = features.device
    sparse, dense = model.prompt_encoder(
        input_points=coords_xy.reshape(1, n, 1, 2).to(device),
        input_labels=torch.ones((1, n, 1), dtype=torch.int64, device=device),
        input_boxes=None, input_masks=None,
    )
    dec = model.mask_decoder
    dtype = features.dtype
    pe = model.get_image_wide_positional_embeddings().to(dtype)  # (1, C, h, w)
    b, c, hh, ww = features.shape
    keys = (features + dense.to(dtype)).flatten(2).transpose(1, 2)  # (1, S, C)
    key_pe = pe.flatten(2).transpose(1, 2)  # (1, S, C)
    out_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0).to(dtype)
    tokens = torch.cat([out_tokens.expand(n, -1, -1), sparse[0].to(dtype)], dim=1)  # (N, T, C)
    query_pe = tokens
    queries = tokens
    shared = True
    for layer in dec.transformer.layers:
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(query=queries[None], key=queries[None], value=queries[None])[0][0]
        else:
            q = (queries + query_pe)[None]
            queries = queries + layer.self_attn(query=q, key=q, value=queries[None])[0][0]
        queries = layer.layer_norm1(queries)
        k_in = keys + key_pe
        queries = layer.layer_norm2(queries + _tokens_to_image(
            layer.cross_attn_token_to_image, queries + query_pe, k_in, keys, shared))
        queries = layer.layer_norm3(queries + layer.mlp(queries))
        attn = _image_to_tokens(layer.cross_attn_image_to_token, k_in, queries + query_pe, queries, shared)
        keys = layer.layer_norm4(keys + attn)  # (N, S, C): from here on, per prompt
        shared = False
    final = dec.transformer.final_attn_token_to_image
    queries = dec.transformer.layer_norm_final_attn(
        queries + _tokens_to_image(final, queries + query_pe, keys + key_pe, keys, shared))

    iou = dec.iou_prediction_head(queries[:, 0]).float()  # (N, 1 + 3)
    first = 1 if multimask else 0
    count = dec.num_mask_tokens - 1 if multimask else 1
    scores = iou[:, first:first + count]
    keep = torch.ones_like(scores, dtype=torch.bool) if min_score is None else scores > float(min_score)
    rows = torch.nonzero(keep.any(dim=1))[:, 0]
    size = dec.upscale_conv2.out_channels
    low = torch.zeros((0, 4 * hh, 4 * ww), dtype=torch.float32, device=device)
    if rows.numel():
        src = keys[rows].transpose(1, 2).reshape(-1, c, hh, ww)
        up = dec.activation(dec.upscale_layer_norm(dec.upscale_conv1(src)))
        up = dec.activation(dec.upscale_conv2(up))  # (m, 32, 4h, 4w)
        mask_tokens = queries[rows, 1 + first:1 + first + count]  # (m, K, C)
        hyper = torch.stack([dec.output_hypernetworks_mlps[first + i](mask_tokens[:, i]) for i in range(count)], dim=1)
        masks = torch.bmm(hyper, up.reshape(up.shape[0], size, -1)).reshape(-1, count, 4 * hh, 4 * ww)
        sel = keep[rows]
        low = masks[sel].float()
    which = torch.nonzero(keep)[:, 0]
    return low, scores[keep], which
