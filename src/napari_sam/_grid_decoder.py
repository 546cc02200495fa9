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


def _softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax that stays fast when ``dim`` is short (7 prompt tokens): torch's CPU kernel
    vectorises along the reduced axis and is ~4x slower there (and ~3x faster along the
    4096 image tokens, where it is used instead)."""
    e = (x - x.amax(dim, keepdim=True)).exp_()
    return e.div_(e.sum(dim, keepdim=True))


def _scaling(att) -> float:
    # transformers >= 4.48 stores it; older versions computed the same value inline
    return getattr(att, "scaling", (att.internal_dim // att.num_attention_heads) ** -0.5)


def _self_attention(att, query, key, value):
    """transformers' own module on (N, T, C) tokens (it wants a leading batch axis)."""
    out = att(query=query[None], key=key[None], value=value[None])
    return (out[0] if isinstance(out, tuple) else out)[0]  # newer versions return (output, weights)


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
    """(B, N, I) -> (B, h, N, I/h)."""
    b, n, i = x.shape
    return x.reshape(b, n, h, i // h).transpose(1, 2)


def _tokens_to_image(att, q_tokens, k_image, v_image, shared: bool):
    """SamAttention(query=tokens, key=image, value=image) -> (N, T, C).

    ``shared``: ``k_image``/``v_image`` are the image side's key and value projections,
    split into heads, computed once for all prompts ((1, h, S, d)). Otherwise they are the
    per-prompt image tokens (N, S, C) and the projections are folded into the tokens.
    """
    h = att.num_attention_heads
    q = _heads(att.q_proj(q_tokens), h)  # (N, h, T, d)
    n, _, t, d = q.shape
    if shared:
        # along the 4096 image tokens torch's own kernel is the faster (3x measured)
        probs = torch.softmax((q @ k_image.transpose(-1, -2)) * _scaling(att), dim=-1)  # (N, h, T, S)
        out = probs @ v_image  # (N, h, T, d)
    else:
        c = k_image.shape[-1]
        wk = att.k_proj.weight.reshape(h, d, c)
        wv = att.v_proj.weight.reshape(h, d, c)
        folded = torch.einsum("nhtd,hdc->nhtc", q, wk).reshape(n, h * t, c)
        # q·b_k is constant along the image axis: softmax ignores it.
        # (N, S, hT): the image tokens stay the contiguous left operand (no transposed copy)
        logits = torch.bmm(k_image, folded.transpose(1, 2)) * _scaling(att)
        probs = torch.softmax(logits, dim=1)  # the long image axis: torch's kernel (2.4x measured)
        ctx = torch.bmm(probs.transpose(1, 2), v_image).reshape(n, h, t, c)  # (N, h, T, C)
        # rows of probs sum to 1, so the value bias passes through unchanged
        out = torch.einsum("nhtc,hdc->nhtd", ctx, wv) + att.v_proj.bias.reshape(1, h, 1, d)
    out = out.transpose(1, 2).reshape(n, t, h * d)
    return att.out_proj(out)


def _image_to_tokens(att, q_image, k_tokens, v_tokens, shared: bool):
    """SamAttention(query=image, key=tokens, value=tokens) -> (N, S, C).

    ``shared``: ``q_image`` is the image side's query projection in heads (1, h, S, d),
    computed once; otherwise the per-prompt image tokens (N, S, C).
    """
    h = att.num_attention_heads
    k = _heads(att.k_proj(k_tokens), h)  # (N, h, T, d)
    v = _heads(att.v_proj(v_tokens), h)
    n, _, t, d = k.shape
    c = att.out_proj.weight.shape[0]
    wo = att.out_proj.weight.reshape(c, h, d).permute(1, 2, 0)  # (h, d, C)
    vo = torch.einsum("nhtd,hdc->nhtc", v, wo).reshape(n, h * t, c)  # values already through out_proj
    if shared:
        logits = (q_image @ k.transpose(-1, -2)) * _scaling(att)  # (N, h, S, T)
        s = logits.shape[2]
        probs = _softmax(logits, dim=-1).transpose(1, 2).reshape(n, s, h * t)
    else:
        wq = att.q_proj.weight.reshape(h, d, c)
        folded = torch.einsum("nhtd,hdc->nhtc", k, wq).reshape(n, h * t, c)
        bias = torch.einsum("nhtd,hd->nht", k, att.q_proj.bias.reshape(h, d)).reshape(n, 1, h * t)
        logits = (torch.bmm(q_image, folded.transpose(1, 2)) + bias) * _scaling(att)  # (N, S, hT)
        s = logits.shape[1]
        probs = _softmax(logits.reshape(n, s, h, t), dim=-1).reshape(n, s, h * t)
    return torch.bmm(probs, vo).add_(att.out_proj.bias)


# Prompts pushed through the per-prompt stage together: small enough that the (n, 4096, 256)
# intermediates stay in the CPU cache (1 measured best on a 2-core EPYC).
CHUNK = 1


def decode_points(model, features: torch.Tensor, coords_xy: torch.Tensor, *, multimask: bool = True,
                  min_score: float | None = None, chunk: int | None = None):
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
    return decode_prompts(model, features, sparse[0], dense[:1], multimask=multimask, min_score=min_score,
                          chunk=chunk)


def decode_prompts(model, features: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor, *,
                   multimask: bool = True, min_score: float | None = None, chunk: int | None = None):
    """SAM's mask decoder for N prompt sets on one image embedding: what
    ``SamModel(image_embeddings=..., input_points/boxes/masks=...)`` computes after its
    prompt encoder, without copying the image embedding per prompt.

    ``sparse`` (N, T, C): the prompt encoder's tokens, one row per prompt set. ``dense``
    (1, C, h, w) when the prompts have no mask input (the image side of the first block
    is then projected once for all of them), else (N, C, h, w). Returns as
    :func:`decode_points`."""
    n = sparse.shape[0]
    device = features.device
    dtype = features.dtype
    dec = model.mask_decoder
    pe = model.get_image_wide_positional_embeddings().to(dtype)  # (1, C, h, w)
    _, c, hh, ww = features.shape
    if n == 0:
        return (torch.zeros((0, 4 * hh, 4 * ww), device=device), torch.zeros(0, device=device),
                torch.zeros(0, dtype=torch.int64, device=device))
    # contiguous (1 or N, S, C): strided image tokens make every later add several times slower
    keys = (features + dense.to(dtype)).flatten(2).transpose(1, 2).contiguous()
    key_pe = pe.flatten(2).transpose(1, 2).contiguous()
    pre = k_in = None
    shared = keys.shape[0] == 1
    if shared:  # the first block's image side is the same for every prompt: project it once
        first_layer = dec.transformer.layers[0]
        k_in = keys + key_pe
        t2i, i2t = first_layer.cross_attn_token_to_image, first_layer.cross_attn_image_to_token
        pre = (_heads(t2i.k_proj(k_in), t2i.num_attention_heads), _heads(t2i.v_proj(keys), t2i.num_attention_heads),
               _heads(i2t.q_proj(k_in), i2t.num_attention_heads))
    out_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0).to(dtype)
    tokens = torch.cat([out_tokens.expand(n, -1, -1), sparse.to(dtype)], dim=1)  # (N, T, C)
    lows, scores, which = [], [], []
    if chunk is None:  # CPUs: small chunks stay in cache; accelerators want the whole batch
        chunk = CHUNK if device.type == "cpu" else n
    step = max(1, int(chunk))
    for start in range(0, n, step):
        chunk_keys = keys if shared else keys[start:start + step]
        low, sc, idx = _decode_chunk(dec, tokens[start:start + step], chunk_keys, key_pe, k_in, pre,
                                     (c, hh, ww), multimask, min_score, shared)
        lows.append(low)
        scores.append(sc)
        which.append(idx + start)
    return torch.cat(lows), torch.cat(scores), torch.cat(which)


def _decode_chunk(dec, tokens, keys, key_pe, k_in, pre, shape, multimask, min_score, shared):
    c, hh, ww = shape
    query_pe = tokens
    queries = tokens
    for layer in dec.transformer.layers:
        if layer.skip_first_layer_pe:
            queries = _self_attention(layer.self_attn, queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + _self_attention(layer.self_attn, q, q, queries)
        queries = layer.layer_norm1(queries)
        if shared:
            t2i_k, t2i_v, i2t_q = pre
        else:
            k_in = keys + key_pe
            t2i_k, t2i_v, i2t_q = k_in, keys, k_in
        queries = layer.layer_norm2(queries + _tokens_to_image(
            layer.cross_attn_token_to_image, queries + query_pe, t2i_k, t2i_v, shared))
        queries = layer.layer_norm3(queries + layer.mlp(queries))
        attn = _image_to_tokens(layer.cross_attn_image_to_token, i2t_q, queries + query_pe, queries, shared)
        keys = layer.layer_norm4(keys + attn)  # (n, S, C): from here on, per prompt
        shared = False
    # The final token-to-image attention, per token: the IoU token for every prompt, the mask
    # tokens only for prompts that keep a candidate (the others are never upsampled).
    final, norm = dec.transformer.final_attn_token_to_image, dec.transformer.layer_norm_final_attn
    k_fin = keys + key_pe
    iou_token = norm(queries[:, :1] + _tokens_to_image(final, queries[:, :1] + query_pe[:, :1], k_fin, keys, False))
    iou = dec.iou_prediction_head(iou_token[:, 0]).float()  # (n, 1 + 3)
    first = 1 if multimask else 0
    count = dec.num_mask_tokens - 1 if multimask else 1
    scores = iou[:, first:first + count]
    keep = torch.ones_like(scores, dtype=torch.bool) if min_score is None else scores > float(min_score)
    rows = torch.nonzero(keep.any(dim=1))[:, 0]
    size = dec.upscale_conv2.out_channels
    low = torch.zeros((0, 4 * hh, 4 * ww), dtype=torch.float32, device=keys.device)
    if rows.numel():
        tok = slice(1 + first, 1 + first + count)
        mask_tokens = norm(queries[rows, tok] + _tokens_to_image(
            final, queries[rows, tok] + query_pe[rows, tok], k_fin[rows], keys[rows], False))  # (m, K, C)
        # The upsampling (the costliest step per prompt) only for prompts with a candidate kept.
        src = keys[rows].transpose(1, 2).reshape(-1, c, hh, ww)
        up = dec.activation(dec.upscale_layer_norm(dec.upscale_conv1(src)))
        up = dec.activation(dec.upscale_conv2(up))  # (m, 32, 4h, 4w)
        hyper = torch.stack([dec.output_hypernetworks_mlps[first + i](mask_tokens[:, i]) for i in range(count)], dim=1)
        masks = torch.bmm(hyper, up.reshape(up.shape[0], size, -1)).reshape(-1, count, 4 * hh, 4 * ww)
        low = masks[keep[rows]].float()
    return low, scores[keep], torch.nonzero(keep)[:, 0]
