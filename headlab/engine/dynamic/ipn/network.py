"""The importance prediction network (IPN): per token and layer, which FFN channels (and query heads) to keep.

Per layer l the network reads two things, as input- and weight-conditioned masks need:

- the input: x, the hidden state entering the FFN (after the post-attention norm); for heads, the
  hidden state entering attention (after the input norm);
- the layer's weights, through a descriptor computed once: a 4-bit sketch of the gate and up
  projections (headlab.engine.dynamic.sketch, 1/8 of their fp32 bytes) and the norm of each channel's
  down column. By default ("rotated") the sketch is of the weights in a randomly rotated input space
  (headlab.engine.dynamic.rotation), so it cannot reproduce weights that are themselves 4-bit (the shipped
  models are); "aligned" sketches the weights as stored.

From them it estimates, for every channel j, the quantities the oracle ranks by,
log|act(gate_j(x))| and log|up_j(x)|, and scores the channel

    s_j(x) = alpha_l * log|act(ĝ_j)| + beta_l * log|û_j| + gamma_l * log||down_j|| + c_lj,

(alpha = beta = 1, gamma = c = 0 is the oracle's score computed on the sketch). The channel is kept
when s_j(x) > tau_l(x), a learned threshold per layer; with `adaptive`, tau_l(x) = tau_l + v_l . (x / rms(x)) / sqrt(d),
so the count a token keeps follows the token. Query heads are scored by a learned linear map of the
attention input, r_lh(x) = w_lh . x / rms(x) + b_lh, kept when r > 0 (b is the learned threshold).

Training (headlab.engine.dynamic.ipn.train) relaxes both comparisons with a straight-through sigmoid: the
forward pass uses the hard mask, the backward pass the gradient of sigmoid((s - tau) / temperature).
`untrained_ipn` (headlab.engine.dynamic.ipn.calibrate) gives the network with the oracle's score on the sketch and
per-layer thresholds calibrated to a target sparsity, no training at all.

Related work: Deja Vu (Liu et al. 2023) predicts per-token sparsity with small MLPs trained on
oracle labels; CATS / TEAL / WINA threshold one activation; this network instead reads a
low-precision copy of the very weights it gates, and learns only how to weigh and threshold what
that copy estimates (a few parameters per layer and one per channel), end to end against the dense
model.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from headlab.engine.core.handle import ModelHandle
from headlab.engine.dynamic.rotation import ROTATED, SKETCHES, input_rotation
from headlab.engine.dynamic.sketch import Int4Sketch

__all__ = ["EPS", "IPN", "IPNError", "LayerSketch", "layer_sketches"]

#: Added before a log so an exactly zero estimate scores finitely.
EPS = 1e-6


class IPNError(ValueError):
    """An importance network that does not fit the model, or a predictor file that cannot be read."""


@dataclass(frozen=True)
class LayerSketch:
    """One layer's weight descriptor: the sketch of [gate; up] stacked ([2F, d]) and log ||down[:, j]|| [F].

    With a `rotation` R [d, d] the sketch is of [gate; up] R, and inputs are rotated before the product
    (headlab.engine.dynamic.rotation): the same estimate of x W^T, from a sketch off the weights' own grid.
    """

    gate_up: Int4Sketch
    log_down_norm: torch.Tensor
    act: object  # the FFN activation (callable)
    rotation: torch.Tensor | None = None

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """[gate; up](x) estimated from the sketch: [..., 2F], a fresh float32 buffer."""
        if self.rotation is not None:
            x = x.float() @ self.rotation.to(x.device)  # x' = x R
        return self.gate_up.matmul(x)

    def estimate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(act(gate(x)), up(x)) estimated from the sketch, each [..., F] float32."""
        g, u = self.product(x).chunk(2, dim=-1)
        return self.act(g), u


_SKETCHES: weakref.WeakKeyDictionary[nn.Module, dict[str, list[LayerSketch]]] = weakref.WeakKeyDictionary()


def layer_sketches(handle: ModelHandle, sketch: str = ROTATED) -> list[LayerSketch]:
    """Every layer's sketch of `handle`'s model (`sketch`: "rotated" or "aligned", headlab.engine.dynamic.rotation),
    made once per model and kind and kept beside it (the model is not changed)."""
    if sketch not in SKETCHES:
        raise IPNError(f"unknown sketch {sketch!r}; choose one of {', '.join(SKETCHES)}")
    model = handle.model
    cached = _SKETCHES.setdefault(model, {})
    if sketch in cached:
        return cached[sketch]
    adapter = handle.adapter
    rotation = input_rotation(handle.geometry.hidden) if sketch == ROTATED else None
    out = []
    with torch.no_grad():
        for layer in range(handle.geometry.n_layers):
            p = adapter.projections(layer)
            if "gate" not in p:
                raise IPNError(f"{handle.name} has no gated FFN (gate and up projections): the importance network "
                               f"scores gated FFN channels")
            w = torch.cat([p["gate"].weight, p["up"].weight]).detach()
            r = None if rotation is None else rotation.to(w.device)
            out.append(LayerSketch(Int4Sketch.of(w.float() @ r if r is not None else w),
                                   p["down"].weight.detach().float().norm(dim=0).clamp(min=EPS).log(),
                                   adapter.ffn_activation(layer), r))
    cached[sketch] = out
    return out


def _rms_normalised(x: torch.Tensor) -> torch.Tensor:
    return x / x.float().pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()


class IPN(nn.Module):
    """Per-layer channel (and optionally head) importance with learned thresholds; see the module docstring.

    Parameters (all float32): alpha, beta, gamma, tau [L]; channel_bias [L, F]; adapt [L, d] (zeros unless
    `adaptive`); head_weight [L, H, d], head_bias [L, H] (only with `heads`); lora_a [L, r, F], lora_b [L, d, r]
    (only with `lora_rank` r > 0: LoRA on the down projections, the model's only change, applied per call). Buffers hold nothing of
    the model: the sketches are attached per model with `attach(handle)` and never saved.
    """

    def __init__(self, n_layers: int, ffn_dim: int, hidden: int, n_heads: int, *, heads: bool = False,
                 adaptive: bool = True, target: float = 0.5, head_target: float = 0.0, temperature: float = 0.5,
                 lora_rank: int = 0, sketch: str = ROTATED):
        super().__init__()
        if sketch not in SKETCHES:
            raise IPNError(f"unknown sketch {sketch!r}; choose one of {', '.join(SKETCHES)}")
        self.sketch = sketch
        if not 0.0 <= target < 1.0:
            raise IPNError(f"target FFN sparsity must be in [0, 1), got {target}")
        if not 0.0 <= head_target < 1.0:
            raise IPNError(f"target head sparsity must be in [0, 1), got {head_target}")
        self.n_layers, self.ffn_dim, self.hidden, self.n_heads = n_layers, ffn_dim, hidden, n_heads
        self.heads, self.adaptive = heads, adaptive
        self.target, self.head_target, self.temperature = target, head_target, temperature
        self.alpha = nn.Parameter(torch.ones(n_layers))
        self.beta = nn.Parameter(torch.ones(n_layers))
        self.gamma = nn.Parameter(torch.zeros(n_layers))
        self.tau = nn.Parameter(torch.zeros(n_layers))
        self.channel_bias = nn.Parameter(torch.zeros(n_layers, ffn_dim))
        self.adapt = nn.Parameter(torch.zeros(n_layers, hidden), requires_grad=adaptive)
        if heads:
            self.head_weight = nn.Parameter(torch.zeros(n_layers, n_heads, hidden))
            self.head_bias = nn.Parameter(torch.full((n_layers, n_heads), 3.0))
        if lora_rank < 0:
            raise IPNError(f"LoRA rank must be >= 0, got {lora_rank}")
        self.lora_rank = lora_rank
        if lora_rank:
            # LoRA (Hu et al. 2022) on each FFN's down projection, trained with the network: B A h is added to
            # down(h) for the masked h, so the model learns to live with the channels it drops. B starts at 0.
            self.lora_a = nn.Parameter(torch.randn(n_layers, lora_rank, ffn_dim) / ffn_dim ** 0.5)
            self.lora_b = nn.Parameter(torch.zeros(n_layers, hidden, lora_rank))
        self._sketches: list[LayerSketch] | None = None

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def for_model(cls, handle: ModelHandle, **kwargs) -> IPN:
        """An IPN shaped for `handle` (a gated-FFN causal LM), with its sketches attached."""
        g = handle.geometry
        return cls(g.n_layers, g.ffn_dim, g.hidden, g.n_heads, **kwargs).attach(handle)

    def attach(self, handle: ModelHandle) -> IPN:
        """Check the shapes against `handle` and attach its weight sketches (made once per model)."""
        g = handle.geometry
        want = (g.n_layers, g.ffn_dim, g.hidden, g.n_heads)
        have = (self.n_layers, self.ffn_dim, self.hidden, self.n_heads)
        if want != have:
            raise IPNError(f"this importance network is shaped for (layers, FFN channels, hidden, heads) = {have}, "
                           f"{handle.name} has {want}")
        self._sketches = layer_sketches(handle, self.sketch)
        return self

    @property
    def sketches(self) -> list[LayerSketch]:
        if self._sketches is None:
            raise IPNError("the importance network has no model attached: call ipn.attach(handle) first")
        return self._sketches

    @property
    def predictor_bytes(self) -> int:
        """Weight bytes the network reads per token: every layer's sketch and its own per-layer parameters."""
        own = sum(p[0].numel() * 4 for p in (self.channel_bias,))  # one row of channel biases per layer
        own += (self.hidden * 4 if self.adaptive else 0) + (self.n_heads * self.hidden * 4 if self.heads else 0)
        rotation = self.sketches[0].rotation  # one R shared by every layer, counted once
        return (sum(s.gate_up.nbytes for s in self.sketches) + self.n_layers * own
                + (0 if rotation is None else rotation.numel() * rotation.element_size()))

    # --- scoring ------------------------------------------------------------------------------
    def channel_scores(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """s [..., F] for the FFN input x [..., d]; differentiable in the network's parameters, not in x."""
        sk = self.sketches[layer]
        with torch.no_grad():
            a, u = sk.estimate(x.detach())
            la, lu = a.abs().add(EPS).log(), u.abs().add(EPS).log()
        return (self.alpha[layer] * la + self.beta[layer] * lu + self.gamma[layer] * sk.log_down_norm.to(x.device)
                + self.channel_bias[layer])

    def channel_threshold(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """tau_l(x) [..., 1]."""
        t = self.tau[layer].expand(*x.shape[:-1], 1)
        if self.adaptive:
            t = t + (_rms_normalised(x.detach()).float() @ self.adapt[layer])[..., None] / self.hidden ** 0.5
        return t

    def channel_margin(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """s - tau [..., F]: positive where the channel is kept."""
        return self.channel_scores(layer, x) - self.channel_threshold(layer, x)

    @torch.no_grad()
    def channel_keep(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Bool [..., F]: the channels a token with FFN input x keeps.

        The same arithmetic as `channel_margin(layer, x) > 0`, element for element and in the same order
        (so a decode step and a batched forward decide alike), done in place on one buffer: a decoded
        token pays for the sketch's product and a handful of vector operations, not a chain of temporaries.
        """
        sk = self.sketches[layer]
        gu = sk.product(x)  # [..., 2F], a fresh float32 buffer
        n = self.ffn_dim
        g, u = gu[..., :n], gu[..., n:]
        g.copy_(sk.act(g))
        gu.abs_().add_(EPS).log_()
        g.mul_(self.alpha[layer])
        u.mul_(self.beta[layer])
        g.add_(u)
        g.add_(self.gamma[layer] * sk.log_down_norm.to(x.device))
        g.add_(self.channel_bias[layer])
        return g > self.channel_threshold(layer, x)

    def head_margin(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """r [..., H] for the attention input x [..., d] (positive: kept), or None without head prediction."""
        if not self.heads:
            return None
        return _rms_normalised(x.detach()).float() @ self.head_weight[layer].T + self.head_bias[layer]

    @torch.no_grad()
    def head_keep(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """Bool [..., H]: the query heads a token keeps (None: the network does not predict heads)."""
        m = self.head_margin(layer, x)
        return None if m is None else m > 0

    def lora_delta(self, layer: int, h: torch.Tensor) -> torch.Tensor | None:
        """B A h [..., d] for the (masked) down input h [..., F], or None without LoRA."""
        if not self.lora_rank:
            return None
        return (h.float() @ self.lora_a[layer].T) @ self.lora_b[layer].T

    def config(self) -> dict:
        """What rebuilds this network's shape (saved beside its weights)."""
        return {"n_layers": self.n_layers, "ffn_dim": self.ffn_dim, "hidden": self.hidden, "n_heads": self.n_heads,
                "heads": self.heads, "adaptive": self.adaptive, "target": self.target,
                "head_target": self.head_target, "temperature": self.temperature, "lora_rank": self.lora_rank,
                "sketch": self.sketch}
