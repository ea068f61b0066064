"""A model split by a device map (accelerate) gives the same scores, perplexity and generation as the model loaded whole.

On this CPU-only machine the split that really moves weights is disk offload: the offloaded
layers' parameters sit on the meta device and accelerate loads them for each forward. Every
comparison below is exact (0.0): the same kernels run on the same device, only the weights travel.
"""

from __future__ import annotations

import pytest
import torch

from headlab.engine.cli.main import main
from headlab.engine.core.mask import PruneMask
from headlab.engine.data.datasets import calibration_texts
from headlab.engine.export.surgery import prune
from headlab.engine.importance.registry import score
from headlab.engine.models import placement
from headlab.engine.models.load import load_model
from headlab.engine.runtime.evaluate import PerplexityProtocol, generate, perplexity
from headlab.engine.runtime.prefix_cache import PrefixCache
from headlab.engine.runtime.sparse_forward import sparse_refusal
from tests.tiny import save_tiny

# layer 1 and the LM head on disk, the rest on the CPU
SPLIT = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
         "model.rotary_emb": "cpu", "lm_head": "disk"}
CRITERIA = ["entropy", "magnitude", "gradient", "activation", "fluctuation", "ablation"]
PROTOCOL = PerplexityProtocol(window=64, stride=64, n_windows=3)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pair(request, tmp_path_factory):
    folder = save_tiny(tmp_path_factory.mktemp(request.param), request.param)
    return load_model(str(folder)), load_model(str(folder), device_map=SPLIT)


def _mask(handle) -> PruneMask:
    m = PruneMask.dense(handle.geometry)
    m.heads[1, 2] = 0.0
    m.ffn[0, :10] = 0.0
    m.ffn[1, 5:9] = 0.0
    return m


def test_the_split_model_really_offloads_its_layers(pair):
    _, split = pair
    assert placement.is_offloaded(split.model)
    offloaded = split.adapter.layers()[1]
    assert all(p.device.type == "meta" for p in offloaded.parameters())
    assert split.meta["device_layout"] == {"cpu": ["model.embed_tokens", "model.layers.0", "model.norm",
                                                   "model.rotary_emb"], "disk": ["model.layers.1", "lm_head"]}
    assert split.device == torch.device("cpu")
    assert "device map" in sparse_refusal(split, _mask(split))


def test_scores_of_every_criterion_equal_the_whole_models(pair):
    whole, split = pair
    texts = calibration_texts("wikitext", 4)
    a, stats_a = score(whole, texts, CRITERIA, max_length=64)
    b, stats_b = score(split, texts, CRITERIA, max_length=64)
    for name in CRITERIA:
        for unit in ("heads", "ffn"):
            x, y = getattr(a[name], unit), getattr(b[name], unit)
            if x is None:
                continue
            assert x.abs().sum() > 0, f"{name} {unit} scores are all zero: the comparison would prove nothing"
            assert torch.equal(x, y), f"{name} {unit}: max |diff| {float((x - y).abs().max())}"
    assert torch.equal(stats_a.head_grad, stats_b.head_grad)
    assert stats_a.loss == stats_b.loss


def test_perplexity_prefix_cache_and_generation_equal_the_whole_models(pair):
    whole, split = pair
    mask = _mask(whole)
    assert perplexity(split, None, PROTOCOL).perplexity == perplexity(whole, None, PROTOCOL).perplexity
    hooked = perplexity(whole, mask, PROTOCOL, use_kernels=False).perplexity
    assert perplexity(split, mask, PROTOCOL).perplexity == hooked
    assert PrefixCache(split, PROTOCOL).perplexity(mask).perplexity == pytest.approx(hooked, rel=1e-6)
    for m in (None, mask):
        assert generate(split, "Hello there", m, max_new_tokens=8) == generate(whole, "Hello there", m,
                                                                               max_new_tokens=8)


def test_auto_map_with_a_cpu_limit_offloads_what_does_not_fit(tmp_path):
    folder = save_tiny(tmp_path / "m", "llama")
    whole = load_model(str(folder))
    split = load_model(str(folder), device_map="auto", max_memory="cpu=400KB")
    layout = split.meta["device_layout"]
    assert "disk" in layout and "cpu" in layout
    mask = _mask(whole)
    assert perplexity(split, mask, PROTOCOL).perplexity == perplexity(whole, mask, PROTOCOL,
                                                                      use_kernels=False).perplexity


def test_surgery_refuses_an_offloaded_model_with_the_reason(pair):
    _, split = pair
    with pytest.raises(ValueError, match="split by a device map"):
        prune(split, _mask(split))


@pytest.mark.parametrize("device_map, max_memory, message", [
    ("everywhere", None, "not one of auto"),
    ('{"model.layers.0": "gpu"}', None, "a device is a GPU index"),
    ('{"": 0}', None, "names GPU 0, but this machine has"),
    ("auto", "cpu:1GB", "device=size pairs"),
    (None, "cpu=1GB", "max memory applies to a device map"),
])
def test_bad_device_maps_are_refused_with_a_clear_error(tmp_path, device_map, max_memory, message):
    if message.startswith("names GPU") and torch.cuda.device_count() > 0:
        pytest.skip("this machine has a GPU 0")
    folder = save_tiny(tmp_path / "m", "llama")
    with pytest.raises(ValueError, match=message):
        load_model(str(folder), device_map=device_map, max_memory=max_memory)


def test_the_cli_evaluates_a_split_model(tmp_path, capsys):
    folder = save_tiny(tmp_path / "m", "llama")
    map_file = tmp_path / "map.json"
    map_file.write_text('{"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", '
                        '"model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}')
    argv = ["eval", "--model", str(folder), "--window", "64", "--stride", "64", "--windows", "2"]
    assert main(argv) == 0
    whole = capsys.readouterr()
    assert main(argv + ["--device-map", str(map_file)]) == 0
    split = capsys.readouterr()
    assert "device map: cpu: embed_tokens, layer 0, norm, rotary_emb, lm_head; disk: layer 1" in split.err
    assert whole.out == split.out and "perplexity" in split.out
