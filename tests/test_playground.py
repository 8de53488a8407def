"""The web playground in real headless Chromium (Debian `chromium` driven by Playwright): chat, stream, switch."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import build_tiny
from lmtailor.serve import create_app, running

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed")
KEY = "pg-key"


def talkative(folder: Path, seed: int) -> Path:
    """A tiny model whose greedy answers are varied visible text: larger random weights (so answers are not one
    token repeated, which the repetition stop would cut), and EOS and whitespace-only tokens can never win."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    build_tiny(folder, seed=seed)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    silent = [i for t, i in tok.get_vocab().items() if i in tok.all_special_ids or not tok.decode([i]).strip()]
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.2)
        # Tied head: a zero row gives these tokens logit 0, below the best of the other (random) logits.
        model.get_input_embeddings().weight[silent] = 0
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[str]]]:
    root = tmp_path_factory.mktemp("pg")
    targets = [str(talkative(root / "alpha", 0)), str(talkative(root / "beta", 1))]
    with running(create_app(targets, api_key=KEY)) as url:
        yield url, ["alpha", "beta"]


@pytest.fixture(scope="module")
def page(site):  # type: ignore[no-untyped-def]
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        pg = browser.new_page()
        pg.set_default_timeout(30_000)
        yield pg
        browser.close()


def _answer(url: str, model: str, text: str) -> str:
    import openai

    c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], temperature=0,
                                  max_tokens=24)
    return r.choices[0].message.content


def _send(page, text: str) -> None:  # type: ignore[no-untyped-def]
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    page.wait_for_function("() => !document.querySelector('.msg.streaming') && !document.getElementById('send')"
                           ".disabled && document.querySelectorAll('.msg.assistant, .msg.error').length > 0")


def test_chat_streams_and_switches_model(site, page) -> None:  # type: ignore[no-untyped-def]
    url, (alpha, beta) = site
    page.goto(url + "/")
    page.fill("#apikey", KEY)
    page.dispatch_event("#apikey", "change")
    page.wait_for_function("() => document.querySelectorAll('#model-a option').length === 2")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "24")
    page.select_option("#model-a", alpha)
    # Count DOM updates of the pane: a streamed answer is written delta by delta, not once at the end.
    page.evaluate("""() => { window.updates = 0;
        new MutationObserver((records) => { window.updates += records.length; })
            .observe(document.getElementById('pane-a'), {subtree: true, characterData: true, childList: true}); }""")
    _send(page, "list files")
    got = page.inner_text("#pane-a .msg.assistant")
    assert got.strip() and got.strip() == _answer(url, alpha, "list files").strip()
    assert page.evaluate("window.updates") > 3, "the answer should appear piece by piece"
    assert page.inner_text("#pane-a .msg.user") == "list files"

    page.select_option("#model-a", beta)  # switching model starts a new chat with it
    assert page.locator("#pane-a .msg").count() == 0
    assert page.inner_text("#pane-a .pane-title") == beta
    _send(page, "list files")
    assert page.inner_text("#pane-a .msg.assistant").strip() == _answer(url, beta, "list files").strip()

    page.check("#side-by-side")
    page.select_option("#model-b", alpha)
    page.select_option("#model-a", beta)
    _send(page, "disk usage")
    page.wait_for_function("() => document.querySelectorAll('#pane-b .msg.assistant').length === 1")
    assert page.inner_text("#pane-a .msg.assistant").strip() == _answer(url, beta, "disk usage").strip()
    assert page.inner_text("#pane-b .msg.assistant").strip() == _answer(url, alpha, "disk usage").strip()
    assert page.locator(".msg.error").count() == 0


def test_playground_reports_a_bad_key(site, page) -> None:  # type: ignore[no-untyped-def]
    url, _ = site
    page.goto(url + "/")
    page.fill("#apikey", "wrong")
    page.dispatch_event("#apikey", "change")
    page.wait_for_function("() => document.getElementById('status').textContent.includes('API key')")
