"""A compact PyTorch NEO written from NEO_PAPER.md §1.2-1.6 (not from any released code), for tests.

It reads an exported official checkpoint (config.json + safetensors) and scores ONE document with at most
one image given as a [3, H, W] pixel tensor, using the paper's definitions independently of neo-jax:
positions from the T/H/W formula of §1.5, the inference mask of §1.6 (k <= q OR same T), Conv2d PEL with the
interleaved 2D rotary of §1.2, and rotate-half Native-RoPE in every layer.
"""
import json
import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file


def load(directory):
    with open(os.path.join(directory, "config.json")) as f:
        cfg = json.load(f)
    sd = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            sd.update(load_file(os.path.join(directory, name)))
    return cfg, {k: v.float() for k, v in sd.items()}


def rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope_half(x, pos, theta):  # x [L, heads, d], pos [L]
    d = x.shape[-1]
    ang = pos.double()[:, None] * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.cat([ang, ang], -1)[:, None, :]
    x1, x2 = x.chunk(2, -1)
    return (x * ang.cos() + torch.cat([-x2, x1], -1) * ang.sin()).float()


def rope_interleaved(x, pos, theta):  # x [N, d] rotated by pos [N] on (even, odd) pairs
    d = x.shape[-1]
    ang = pos.double()[:, None] * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    c, s = ang.cos().float(), ang.sin().float()
    a, b = x[:, 0::2], x[:, 1::2]
    return torch.stack([a * c - b * s, a * s + b * c], -1).reshape(x.shape)


def patch_embed(cfg, sd, image):
    """image [3, H, W] -> [(H/32)*(W/32), d] visual tokens (row-major)."""
    vis = cfg["vision_config"]
    p = "vision_model.embeddings."
    x = F.gelu(F.conv2d(image[None], sd[p + "patch_embedding.weight"], sd[p + "patch_embedding.bias"],
                        stride=vis["patch_size"]))[0]  # [Dv, gh, gw]
    dv, gh, gw = x.shape
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    feat = x.permute(1, 2, 0).reshape(gh * gw, dv)
    theta = vis["rope_theta_vision"]
    feat = torch.cat([rope_interleaved(feat[:, : dv // 2], cols.reshape(-1), theta),
                      rope_interleaved(feat[:, dv // 2:], rows.reshape(-1), theta)], -1)
    feat = feat.reshape(gh, gw, dv).permute(2, 0, 1)[None]
    m = round(1 / cfg["downsample_ratio"])
    y = F.conv2d(feat, sd[p + "dense_embedding.weight"], sd[p + "dense_embedding.bias"], stride=m)[0]
    return y.reshape(y.shape[0], -1).T


def positions(tokens, grid, ctx, start):
    """(T, H, W) per token from the paper's formula; grid = merged (rows, cols) of the one image."""
    is_ctx = [t == ctx for t in tokens]
    T, acc, out, k = [], 0, [], 0
    for i, t in enumerate(tokens):
        acc += (not is_ctx[i]) + (i > 0 and tokens[i - 1] == start)
        T.append(acc - 1)
        if is_ctx[i]:
            out.append((T[-1], k // grid[1], k % grid[1]))
            k += 1
        else:
            out.append((T[-1], 0, 0))
    return torch.tensor(out)


def forward(cfg, sd, tokens, image, ctx, start):
    llm = cfg["llm_config"]
    d, nh, nkv, eps = llm["head_dim"], llm["num_attention_heads"], llm["num_key_value_heads"], llm["rms_norm_eps"]
    tok = torch.tensor(tokens)
    x = sd["language_model.model.embed_tokens.weight"][tok].clone()
    img = patch_embed(cfg, sd, image)
    x[tok == ctx] = img
    gh, gw = image.shape[1] // 32, image.shape[2] // 32
    pos = positions(tokens, (gh, gw), ctx, start)
    L = len(tokens)
    qi, ki = torch.arange(L)[:, None], torch.arange(L)[None, :]
    allowed = (ki <= qi) | (pos[:, 0][None, :] == pos[:, 0][:, None])
    for n in range(llm["num_hidden_layers"]):
        w = lambda s: sd[f"language_model.model.layers.{n}.{s}.weight"]  # noqa: E731
        h = rms(x, w("input_layernorm"), eps)

        def qk(proj, heads):
            t = rms((h @ w(f"self_attn.{proj}_proj").T).view(L, heads, d), w(f"self_attn.{proj}_norm"), eps)
            hw = (h @ w(f"self_attn.{proj}_proj_hw").T).view(L, heads, d)
            hh = rms(hw[..., : d // 2], w(f"self_attn.{proj}_norm_h"), eps)
            ww = rms(hw[..., d // 2:], w(f"self_attn.{proj}_norm_w"), eps)
            return torch.cat([rope_half(t, pos[:, 0], llm["rope_theta"]),
                              rope_half(hh, pos[:, 1], llm["rope_theta_hw"]),
                              rope_half(ww, pos[:, 2], llm["rope_theta_hw"])], -1)

        q, k = qk("q", nh), qk("k", nkv)
        v = (h @ w("self_attn.v_proj").T).view(L, nkv, d)
        k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        s = torch.einsum("qhd,khd->hqk", q, k) / d ** 0.5
        a = torch.einsum("hqk,khd->qhd", s.masked_fill(~allowed, float("-inf")).softmax(-1), v)
        x = x + a.reshape(L, nh * d) @ w("self_attn.o_proj").T
        h = rms(x, w("post_attention_layernorm"), eps)
        x = x + (F.silu(h @ w("mlp.gate_proj").T) * (h @ w("mlp.up_proj").T)) @ w("mlp.down_proj").T
    x = rms(x, sd["language_model.model.norm.weight"], eps)
    head = sd["language_model.model.embed_tokens.weight"] if cfg["tie_word_embeddings"] \
        else sd["language_model.lm_head.weight"]
    return x @ head.T
