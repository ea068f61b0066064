"""Shared fixtures: tiny random models of every supported family and a byte-level tokenizer.

Tiny means 2 layers and hidden 64, so every unit test runs in milliseconds on a CPU.
The shipped real models are opened only by tests marked `real_model`.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.tiny import TINY_FAMILIES, tiny_handle

# llama.cpp checks run only when asked (`make test-deploy`): they need llama.cpp's tools, built once by
# `make llama-cpp`; everywhere else they are not collected at all (rather than skipped)
collect_ignore = [] if os.environ.get("HEADLAB_DEPLOY") == "1" else ["deploy"]


def pytest_configure(config):
    config.addinivalue_line("markers", "real_model: opens a shipped real model (slower)")
    config.addinivalue_line("markers", "browser: drives a real chromium browser")
    # pytest-xdist workers share the machine's cores: one thread each when two run at once
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, min(2, torch.get_num_threads()) // workers))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed browser test's report carries what the browser showed and what the server logged."""
    outcome = yield
    report = outcome.get_result()
    browser = getattr(item, "funcargs", {}).get("browser")
    if report.when == "call" and report.failed and browser is not None:
        from tests.browser import failure_context

        shots = item.config._tmp_path_factory.mktemp("failure")
        report.sections.append(("browser and server at the failure", failure_context(browser, shots)))


@pytest.fixture(params=TINY_FAMILIES)
def handle(request):
    """A tiny random model of each family (gpt2, bert, llama with GQA, qwen2 with biases)."""
    return tiny_handle(request.param)


@pytest.fixture
def llama_handle():
    return tiny_handle("llama")


@pytest.fixture(scope="session")
def smollm():
    """The shipped default model (SmolLM2-135M-Instruct), loaded once per test session."""
    from headlab.engine.models.load import load_model

    return load_model()


@pytest.fixture(scope="session")
def minilm():
    """The shipped MiniLM sentence encoder (a real BERT)."""
    from headlab.engine.models.load import load_model

    return load_model("minilm")


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium driven by Playwright (tests/browser.py says how it is launched)."""
    from playwright.sync_api import sync_playwright

    from tests.browser import launch_chromium

    with sync_playwright() as p:
        b = launch_chromium(p)
        try:
            yield b
        finally:
            b.close()
