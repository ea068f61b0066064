"""A uniform mask whose compensation adds O/down biases still exports with Llama's standard config."""

from __future__ import annotations

import torch
import transformers

from headlab.engine.core import gates
from headlab.engine.core.mask import PruneMask
from headlab.engine.core.objective import token_logits
from headlab.engine.export.write import export, preview
from headlab.engine.runtime.cost import cost
from tests.tiny import tiny_handle


def _biased_uniform_mask(g) -> PruneMask:
    m = PruneMask.dense(g)
    m.ffn[:, 3:40] = 0.0
    m.heads[:, [0, g.group_size]] = 0.0
    gen = torch.Generator().manual_seed(0)
    m.attn_bias = 0.05 * torch.randn(g.n_layers, g.hidden, generator=gen)
    m.ffn_bias = 0.05 * torch.randn(g.n_layers, g.hidden, generator=gen)
    return m


def test_llama_bias_switches_keep_a_biased_uniform_export_standard(tmp_path):
    h = tiny_handle("llama")
    m = _biased_uniform_mask(h.geometry)
    assert preview(h, m).layout == "uniform"
    r = export(h, m, tmp_path / "out", evaluate=False)
    assert r.layout == "uniform"
    zeros = r.manifest["params"]["zero_biases_for_the_config"]
    assert zeros > 0 and r.params_after == cost(h, m).params_kept + zeros
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    am = torch.ones_like(ids)
    with torch.no_grad(), gates.apply(h, m):
        ref = token_logits(h, ids, am)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert plain.config.attention_bias and plain.config.mlp_bias
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids, attention_mask=am).logits, ref, atol=1e-4, rtol=0)


def test_a_family_without_the_switch_still_exports_per_layer(tmp_path):
    h = tiny_handle("qwen2")  # Qwen2's o_proj has no bias switch
    m = _biased_uniform_mask(h.geometry)
    assert export(h, m, tmp_path / "out", evaluate=False).layout == "per_layer"
