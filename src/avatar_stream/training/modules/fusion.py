"""Temporal fusion (paper §3.1 TCSAN, and the ablations of tables 3, 4 and 6).

Every variant maps the per-frame cross-modal features f_k = f_id ⊕ f_a_k ⊕ f_au_k of
T + 2R consecutive frames, ``x (B, T+2R, D_in)``, to ``ft (B, T, H)``, where output t
depends on exactly the input frames t .. t+2R (i.e. frame k on k-R..k+R) and on nothing
else. Convolutions are valid (unpadded) and symmetric (non-causal); every attention acts
within one output frame, so no variant leaks context beyond the receptive field.

Attention is written out (Linear, reshape with explicit sizes, softmax, matmul) rather than
``nn.MultiheadAttention`` so that ONNX export cannot bake the batch size into a reshape.
"""

from __future__ import annotations

import torch
from torch import nn

from avatar_stream.training.config import ModelConfig


class TokenAttention(nn.Module):
    """Multi-head attention over a fixed number of tokens per item.

    ``forward(x (N, n_q, dim), kv (N, n_kv, dim) | None) -> (N, n_q, dim)``; with ``kv=None``
    it is self-attention, Q = K = V = x (each through its own projection).
    """

    def __init__(self, dim: int, heads: int, n_q: int, n_kv: int | None = None):
        super().__init__()
        self.dim, self.heads, self.n_q, self.n_kv = dim, heads, n_q, n_kv or n_q
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.scale = self.head_dim**-0.5

    def _split(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x.reshape(-1, n, self.heads, self.head_dim).transpose(1, 2)  # (N, heads, n, hd)

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None) -> torch.Tensor:
        kv = x if kv is None else kv
        q = self._split(self.q(x), self.n_q)
        k = self._split(self.k(kv), self.n_kv)
        v = self._split(self.v(kv), self.n_kv)
        w = torch.softmax((q @ k.transpose(-1, -2)) * self.scale, dim=-1)  # (N, heads, n_q, n_kv)
        y = (w @ v).transpose(1, 2).reshape(-1, self.n_q, self.dim)
        return self.proj(y)


class TemporalBlock(nn.Module):
    """One residual level: valid dilated Conv1d (kernel k, dilation d) and optional attention.

    ``forward(x (B, C_in, T)) -> (B, H, T - 2c)`` with c = (k-1)/2 * d. The residual is the
    centre-cropped input (1x1-projected when C_in != H). ``attention``:
    - None: a plain TCN level (ablation "tcn").
    - "feature_tokens" (our reading of the paper): the conv output of each frame is split into
      ``tokens`` vectors of H/tokens and self-attended (Q = K = V = Z_n), i.e. the attention
      weights elements of the cross-modal feature within the frame.
    - "time": the k dilated taps x_{t-d}, x_t, x_{t+d}, each through its own slice of the
      conv weight, are the tokens; they are self-attended and summed, so the attention weights
      the frames in the conv's own window (the alternative reading) and the receptive field
      is the conv's.
    """

    def __init__(self, cfg: ModelConfig, c_in: int, dilation: int, attention: str | None):
        super().__init__()
        h, k = cfg.tcsan_hidden, cfg.tcsan_kernel
        self.hidden, self.kernel, self.dilation = h, k, dilation
        self.crop = (k - 1) // 2 * dilation
        self.attention = attention
        if attention == "time":
            # One 1x1 conv producing k*H channels = the k taps of a dilated conv, kept apart.
            self.taps = nn.Conv1d(c_in, k * h, 1)
            self.attn = TokenAttention(h, cfg.tcsan_heads, k)
        else:
            self.conv = nn.Conv1d(c_in, h, k, dilation=dilation)
            if attention == "feature_tokens":
                self.tokens, self.token_dim = cfg.tcsan_tokens, cfg.token_dim
                self.attn = TokenAttention(cfg.token_dim, cfg.tcsan_heads, cfg.tcsan_tokens)
        self.res = nn.Conv1d(c_in, h, 1) if c_in != h else nn.Identity()
        self.norm = nn.LayerNorm(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t_out = x.shape[-1] - 2 * self.crop
        res = self.res(x[..., self.crop : self.crop + t_out])  # (B, H, T'): centre crop
        if self.attention == "time":
            z = self._time_attention(x, t_out)
        else:
            z = torch.relu(self.conv(x))  # (B, H, T')
            if self.attention == "feature_tokens":
                zt = z.transpose(1, 2)  # (B, T', H)
                tok = zt.reshape(-1, self.tokens, self.token_dim)  # (B*T', tokens, H/tokens)
                z = (zt + self.attn(tok).reshape(-1, t_out, self.hidden)).transpose(1, 2)
        y = (res + z).transpose(1, 2)  # (B, T', H)
        return self.norm(y).transpose(1, 2)  # per-frame LayerNorm keeps frames independent

    def _time_attention(self, x: torch.Tensor, t_out: int) -> torch.Tensor:
        h, d = self.hidden, self.dilation
        y = self.taps(x)  # (B, k*H, T)
        taps = [y[:, i * h : (i + 1) * h, i * d : i * d + t_out] for i in range(self.kernel)]
        tok = torch.stack(taps, dim=-1).permute(0, 2, 3, 1).reshape(-1, self.kernel, h)  # (B*T', k, H)
        z = (tok + self.attn(tok)).sum(dim=1)  # (B*T', H); without attention: the dilated conv
        return torch.relu(z).reshape(-1, t_out, h).transpose(1, 2)  # (B, H, T')


class TCNStack(nn.Module):
    """``levels`` TemporalBlocks with dilations 1, 2, 4, ...: (B, T+2R, C_in) -> (B, T, H)."""

    def __init__(self, cfg: ModelConfig, c_in: int, attention: str | None):
        super().__init__()
        self.blocks = nn.ModuleList(
            TemporalBlock(cfg, c_in if n == 0 else cfg.tcsan_hidden, d, attention)
            for n, d in enumerate(cfg.dilations))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.transpose(1, 2)  # (B, C, T+2R)
        for block in self.blocks:
            y = block(y)
        return y.transpose(1, 2)  # (B, T, H)


class MHAttTCN(nn.Module):
    """Ablation "mhatt_tcn": one per-frame multi-head self-attention over feature tokens of
    the projected f_k, then a plain TCN (attention once, before the temporal stack)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.hidden, self.tokens, self.token_dim = cfg.tcsan_hidden, cfg.tcsan_tokens, cfg.token_dim
        self.inp = nn.Linear(cfg.fusion_input_dim, cfg.tcsan_hidden)
        self.attn = TokenAttention(cfg.token_dim, cfg.tcsan_heads, cfg.tcsan_tokens)
        self.norm = nn.LayerNorm(cfg.tcsan_hidden)
        self.tcn = TCNStack(cfg, cfg.tcsan_hidden, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t_in = x.shape[1]
        z = self.inp(x)  # (B, T+2R, H)
        a = self.attn(z.reshape(-1, self.tokens, self.token_dim)).reshape(-1, t_in, self.hidden)
        return self.tcn(self.norm(z + a))


class CoAttTCN(nn.Module):
    """Ablation "coatt_tcn": co-attention between the identity and the audio parts of f_k
    (audio tokens query identity tokens and vice versa, per frame), then a plain TCN."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, n, td = cfg.tcsan_hidden, cfg.tcsan_tokens, cfg.token_dim
        self.f_id, self.hidden, self.tokens, self.token_dim = cfg.f_id, h, n, td
        self.id_proj = nn.Linear(cfg.f_id, h)
        self.audio_proj = nn.Linear(cfg.frame_feature_dim, h)
        self.audio_from_id = TokenAttention(td, cfg.tcsan_heads, n)
        self.id_from_audio = TokenAttention(td, cfg.tcsan_heads, n)
        self.norm_audio = nn.LayerNorm(h)
        self.norm_id = nn.LayerNorm(h)
        self.tcn = TCNStack(cfg, 2 * h, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t_in = x.shape[1]
        i = self.id_proj(x[..., : self.f_id])  # (B, T+2R, H)
        a = self.audio_proj(x[..., self.f_id :])  # (B, T+2R, H)
        it = i.reshape(-1, self.tokens, self.token_dim)
        at = a.reshape(-1, self.tokens, self.token_dim)
        a2 = self.norm_audio(a + self.audio_from_id(at, it).reshape(-1, t_in, self.hidden))
        i2 = self.norm_id(i + self.id_from_audio(it, at).reshape(-1, t_in, self.hidden))
        return self.tcn(torch.cat([a2, i2], dim=-1))


class WindowGRU(nn.Module):
    """Ablation "gru": a 2-layer bidirectional GRU over each output frame's own 2R+1 window,
    centre step taken. Recurrent, but with the same context and latency as the TCN variants
    (a GRU over the whole clip would see unbounded past/future and break streaming parity)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.r, self.hidden = cfg.lookahead_frames, cfg.tcsan_hidden
        self.d_in = cfg.fusion_input_dim
        self.gru = nn.GRU(self.d_in, cfg.tcsan_hidden // 2, num_layers=2, batch_first=True, bidirectional=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        span = 2 * self.r + 1
        t_out = x.shape[1] - 2 * self.r
        win = torch.stack([x[:, i : i + t_out] for i in range(span)], dim=2)  # (B, T, 2R+1, D)
        y, _ = self.gru(win.reshape(-1, span, self.d_in))  # (B*T, 2R+1, H)
        return y[:, self.r].reshape(-1, t_out, self.hidden)  # (B, T, H)


def build_fusion(cfg: ModelConfig) -> nn.Module:
    """The fusion named by ``cfg.fusion``; ``cfg.attention`` applies to "tcsan" only."""
    if cfg.fusion == "tcsan":
        return TCNStack(cfg, cfg.fusion_input_dim, cfg.attention)
    if cfg.fusion == "tcn":
        return TCNStack(cfg, cfg.fusion_input_dim, None)
    if cfg.fusion == "mhatt_tcn":
        return MHAttTCN(cfg)
    if cfg.fusion == "coatt_tcn":
        return CoAttTCN(cfg)
    return WindowGRU(cfg)  # "gru"; ModelConfig has validated the name
