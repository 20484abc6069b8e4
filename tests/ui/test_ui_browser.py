"""`lorakit ui` in a real browser: headless Chromium (Debian's package) driven by Playwright,
against `python -m lorakit ui` on 127.0.0.1 with a tiny model folder and two adapters.

Skipped with the reason when Playwright or /usr/bin/chromium is missing (`./install.sh --dev`
installs both).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from serve_support import make_adapters, make_model, make_tokenizer

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
KEY = "sk-ui-browser"
TIMEOUT_MS = 30_000

pytestmark = pytest.mark.slow  # a server process and a browser: ~40 s on a loaded 2-core machine
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (dev extra)")
if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} missing: apt-get install chromium", allow_module_level=True)


def metrics_rows(start: int, stop: int) -> str:
    """Train rows for steps start..stop-1 (loss falling), an eval row every 2 steps."""
    rows = []
    for step in range(start, stop):
        rows.append({"step": step, "kind": "train", "loss": 3.0 / step, "lr": 1e-3})
        if step % 2 == 0:
            rows.append({"step": step, "kind": "eval", "eval_loss": 3.5 / step})
    return "".join(json.dumps(r) + "\n" for r in rows)


def write_runs(root: Path) -> None:
    """A finished run and a running one (its status names this test's process, alive)."""
    for name, status, steps in (("done", "finished", 9), ("live", "running", 3)):
        folder = root / name
        folder.mkdir(parents=True)
        (folder / "metrics.jsonl").write_text(metrics_rows(1, steps))
        record = {"status": status, "host": socket.gethostname(), "pid": os.getpid()}
        (folder / "status.json").write_text(json.dumps({**record, "total_steps": 20}))
    (root / "done" / "samples.jsonl").write_text(
        json.dumps({"step": 8, "prompt": "Who are you?", "completion": "A tiny model."}) + "\n"
    )
    sweep = root / "grid"  # a sweep folder: variant v1 trained, v2 not yet
    (sweep / "v1").mkdir(parents=True)
    (sweep / "v1" / "metrics.jsonl").write_text(metrics_rows(1, 3))
    plan = {"axes": ["lora.r"], "variants": [{"name": "v1"}, {"name": "v2"}]}
    (sweep / "sweep.json").write_text(json.dumps(plan))
    hour_ago = time.time() - 3600
    # newest first: live (a sweep is as new as its folder, which sweep.json just touched)
    for path in [*(root / "done").iterdir(), root / "done", *sweep.rglob("*"), sweep]:
        os.utime(path, (hour_ago, hour_ago))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def ui_process(tmp: Path):
    """`python -m lorakit ui` with the tiny model, adapters a and b, an adapters root, runs."""
    import lorakit

    make_model().save_pretrained(tmp / "model")
    make_tokenizer().save_pretrained(tmp / "model")
    adapters = make_adapters(tmp / "adapters", ["a", "b"])
    write_runs(tmp / "runs")
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "lorakit",
        "ui",
        "--runs",
        str(tmp / "runs"),
        "--model",
        str(tmp / "model"),
        "--adapter",
        f"a={adapters['a']}",
        "--adapter",
        f"b={adapters['b']}",
        "--adapters-root",
        str(tmp / "adapters"),
        "--port",
        str(port),
        "--api-key",
        KEY,
        "--max-model-len",
        "256",
    ]
    src = str(Path(lorakit.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    env.update(OMP_NUM_THREADS="1", LORAKIT_API_KEY="")
    log_path = tmp / "ui.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=log)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and process.poll() is None:
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                time.sleep(0.2)
            assert process.poll() is None, log_path.read_text()[-3000:]
            yield url
        finally:
            process.terminate()
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui_browser")
    with ui_process(tmp) as url, sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        try:
            yield page, url, tmp
        finally:
            browser.close()
    shutil.rmtree(tmp, ignore_errors=True)


def points(page, chart: str) -> int:
    return int(page.get_attribute(f"#{chart}", "data-points") or 0)


def wait_until(page, expression: str) -> None:
    """Wait until a JS expression is true (a function, not a string: the page's CSP forbids
    eval, which Playwright uses for string predicates)."""
    page.wait_for_function(f"() => {expression}")


LOSS_POINTS = "Number(document.querySelector('#chart-loss').dataset.points)"
ERROR_TEXT = "document.querySelector('#error-text').textContent"


def test_a_missing_key_is_explained_then_the_runs_list_draws_the_finished_run(ui):
    page, url, _ = ui
    page.goto(f"{url}/ui/")
    error = page.locator("#error")
    error.wait_for(state="visible")
    assert "missing or wrong API key" in error.inner_text()
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    page.locator("tr[data-path='done']").wait_for()
    assert "finished" in page.inner_text("tr[data-path='done']")
    assert "running" in page.inner_text("tr[data-path='live']")
    assert "2 variants" in page.inner_text("tr.sweep[data-path='grid']")
    assert page.locator("tr.variant[data-path='grid/v1']").count() == 1
    assert "not run" in page.inner_text("tr.variant:has-text('v2')")
    assert page.is_hidden("#error")
    page.check("tr[data-path='done'] input[type=checkbox]")
    page.click("tr[data-path='done'] button")
    wait_until(page, "document.querySelector('#chart-loss').dataset.series >= 1")
    # done has train rows at steps 1-8 and eval rows at 2, 4, 6, 8; live (ticked first, the
    # newest) has 2 and 1: the charts hold both runs' points
    wait_until(page, f"{LOSS_POINTS} === 10")
    assert points(page, "chart-eval") == 5
    assert page.get_attribute("#chart-loss", "data-series") == "2"
    assert "A tiny model." in page.inner_text("#run-detail")


def test_a_running_runs_curve_grows_while_watched(ui):
    page, _, tmp = ui
    page.locator("tr[data-path='live'] input[type=checkbox]").check()
    wait_until(page, f"{LOSS_POINTS} >= 10")
    before = points(page, "chart-loss")
    with (tmp / "runs" / "live" / "metrics.jsonl").open("a") as f:
        f.write(metrics_rows(3, 6))  # steps 3, 4, 5: three more train points
    wait_until(page, f"{LOSS_POINTS} === {before + 3}")


def test_chat_streams_an_answer(ui):
    page, _, _ = ui
    page.click("nav button[data-view=chat]")
    page.select_option("#chat-model", "a")
    page.fill("#chat-params input[name=max_tokens]", "12")
    page.fill("#chat-params input[name=seed]", "1")
    # count the answer's updates (mutation records, not observer calls, which the browser
    # batches): a streamed answer arrives in more than one piece
    page.evaluate(
        """() => { window.updates = 0;
        new MutationObserver((records) => { window.updates += records.length; })
        .observe(document.querySelector('#chat-log'),
                 {subtree: true, childList: true, characterData: true}); }"""
    )
    page.fill("#chat-input", "Hello there")
    page.click("#chat-submit")
    answer = page.locator(".message.assistant[data-done=true]")
    answer.wait_for()
    assert answer.locator(".text").inner_text().strip()
    assert page.evaluate("window.updates") > 3  # the two messages, then piece after piece


def test_compare_shows_two_adapters_answers_for_one_prompt(ui):
    page, _, _ = ui
    page.click("nav button[data-view=compare]")
    page.locator("#compare-models input[value=a]").wait_for()
    for box in page.locator("#compare-models input").all():
        box.set_checked(box.get_attribute("value") in ("a", "b"))
    page.fill("#compare-params input[name=temperature]", "0")
    page.fill("#compare-params input[name=max_tokens]", "12")
    page.fill("#compare-input", "Hello there")
    page.click("#compare-submit")
    wait_until(page, "document.querySelectorAll('.answer[data-done]').length === 2")
    a = page.inner_text(".answer[data-model=a] .text")
    b = page.inner_text(".answer[data-model=b] .text")
    assert page.get_attribute(".answer[data-model=a]", "data-done") in ("stop", "length")
    assert a and b and a != b  # greedy answers of two different adapters


def test_api_errors_are_shown_as_readable_messages(ui):
    page, url, _ = ui
    page.click("nav button[data-view=chat]")
    error = page.locator("#error-text")
    page.fill("#chat-params input[name=temperature]", "5")  # the API allows 0-2
    page.fill("#chat-input", "Hi")
    page.click("#chat-submit")
    page.locator(".message.assistant.error").last.wait_for()
    assert "temperature" in error.inner_text() and "less than or equal to 2" in error.inner_text()
    page.fill("#chat-params input[name=temperature]", "0.7")

    page.click("#load-adapter summary")  # runtime loading under --adapters-root
    page.fill("#load-name", "c")
    page.fill("#load-path", "../model")
    page.click("#load-button")
    wait_until(page, f"{ERROR_TEXT}.includes('..')")
    assert "is not allowed" in error.inner_text()
    page.fill("#load-path", "a")
    page.click("#load-button")
    page.locator("#chat-model option[value=c]").wait_for(state="attached")
    page.select_option("#chat-model", "c")
    headers = {"Authorization": f"Bearer {KEY}"}  # someone else unloads it meanwhile
    httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "c"}, headers=headers)
    page.fill("#chat-input", "Hi again")
    page.click("#chat-submit")
    wait_until(page, f"{ERROR_TEXT}.includes('`c`')")
    assert "The model `c` does not exist" in error.inner_text()
