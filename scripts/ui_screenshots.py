"""Screenshots of `lorakit ui` (docs/img/ui-runs.png, ui-chat.png, ui-compare.png).

    python scripts/ui_screenshots.py [--work /tmp/lorakit-ui-shots] [--out docs/img]

What it does, on a CPU, offline: trains a small sweep of the built-in model on the built-in
identity data (LoRA r=4 and r=16, 20 steps each; skipped when --work holds it already), starts
one more run (r=8 at a lower learning rate) and leaves it training, starts `lorakit ui` over
the runs with the two sweep adapters, and photographs the three views in headless Chromium
(Debian's /usr/bin/chromium, driven by Playwright as in tests/ui/test_ui_browser.py). The
chat and compare answers are the models' real greedy answers. CJK samples need a CJK font
(e.g. Debian's fonts-wqy-zenhei) to show as text.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
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
CONFIG = ROOT / "src" / "lorakit" / "configs" / "smollm2-lora.yaml"
SWEEP = """\
base: {config}
output_dir: {out}
variants:
  r4:  {{lora.r: 4, lora.lora_alpha: 8}}
  r16: {{lora.r: 16, lora.lora_alpha: 32}}
baseline: false
"""
PROMPT = "Who are you?"


def lorakit(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lorakit", *args], env=env, **kwargs)


def train_sweep(work: Path) -> Path:
    sweep_dir = work / "runs" / "identity-ranks"
    if all((sweep_dir / v / "final").is_dir() for v in ("r4", "r16")):
        return sweep_dir
    spec = work / "sweep.yaml"
    spec.write_text(SWEEP.format(config=CONFIG, out=sweep_dir))
    overrides = ["train.max_steps=20", "train.eval_every=5", "train.save_every=20"]
    if lorakit("sweep", str(spec), *overrides, "--resume").wait() != 0:
        raise SystemExit("the sweep failed; see its output above")
    return sweep_dir


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise SystemExit("lorakit ui did not start")


def photograph(url: str, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS
        )
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        page.set_default_timeout(600_000)
        page.goto(f"{url}/ui/#runs")
        page.locator("tr[data-path='live']").wait_for()
        for path in ("identity-ranks/r4", "identity-ranks/r16"):
            page.check(f"tr[data-path='{path}'] input[type=checkbox]")
        page.click("tr[data-path='identity-ranks/r16'] button")
        page.wait_for_function(
            "() => Number(document.querySelector('#chart-eval').dataset.series) === 3"
        )
        page.wait_for_timeout(1500)
        page.screenshot(path=str(out / "ui-runs.png"))

        page.click("nav button[data-view=chat]")
        page.select_option("#chat-model", "r16")
        page.fill("#chat-params input[name=temperature]", "0")
        page.fill("#chat-params input[name=max_tokens]", "48")
        page.fill("#chat-input", PROMPT)
        page.click("#chat-submit")
        page.locator(".message.assistant[data-done=true]").wait_for()
        page.fill("#chat-input", "What can you help me with?")
        page.click("#chat-submit")
        page.locator(".message.assistant[data-done=true] >> nth=1").wait_for()
        page.screenshot(path=str(out / "ui-chat.png"))

        page.click("nav button[data-view=compare]")
        page.fill("#compare-params input[name=temperature]", "0")
        page.fill("#compare-params input[name=max_tokens]", "48")
        page.fill("#compare-input", PROMPT)
        page.click("#compare-submit")
        page.wait_for_function("() => document.querySelectorAll('.answer[data-done]').length === 3")
        page.screenshot(path=str(out / "ui-compare.png"))
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/lorakit-ui-shots"))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    sweep = train_sweep(args.work)
    live_dir = args.work / "runs" / "live"
    if live_dir.exists():
        import shutil

        shutil.rmtree(live_dir)
    live = lorakit(
        "train",
        str(CONFIG),
        f"output_dir={live_dir}",
        "train.max_steps=400",
        "train.lr=3e-4",
        "lora.r=8",
        "lora.lora_alpha=16",
        "train.eval_every=5",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ui = lorakit(
        "ui",
        "--runs",
        str(args.work / "runs"),
        "--model",
        "smollm2-135m-instruct",
        "--adapter",
        f"r4={sweep / 'r4' / 'final'}",
        "--adapter",
        f"r16={sweep / 'r16' / 'final'}",
        "--port",
        str(port),
    )
    try:
        wait_for(url, ui)
        deadline = time.monotonic() + 600  # a few steps of the live run, so its curve shows
        while time.monotonic() < deadline and len(_lines(live_dir / "metrics.jsonl")) < 14:
            time.sleep(2)
        photograph(url, args.out)
    finally:  # SIGTERM: the training run saves a checkpoint first, which takes a while
        for process, grace in ((ui, 60), (live, 600)):
            process.terminate()
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                process.kill()
    names = ("ui-runs.png", "ui-chat.png", "ui-compare.png")
    print(f"wrote {', '.join(str(args.out / n) for n in names)}")


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


if __name__ == "__main__":
    main()
