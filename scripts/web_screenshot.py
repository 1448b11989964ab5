"""Screenshot of the chat page of `zhlora serve` answering a Chinese question, base and adapter side by side.

    python scripts/web_screenshot.py --model_path outputs --output docs/results/web_chat.png

Serves the run in this process (as `zhlora serve` would), drives the page in headless Chromium
(Debian's chromium + chromium-driver, as in tests/test_web.py) through the compare view, and saves
a PNG. Greedy decoding, so the picture shows what the API returns for the question.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def open_browser(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
                 "--window-size=1280,800"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def answers_done(driver, count: int):
    from selenium.webdriver.common.by import By

    bubbles = driver.find_elements(By.CSS_SELECTOR, ".bubble.assistant")
    return len(bubbles) == count and all(b.get_attribute("data-state") == "done" for b in bubbles) and bubbles


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_path", default="outputs")
    parser.add_argument("--output", default="docs/results/web_chat.png")
    parser.add_argument("--question", default="请用汉字写出下面这个数：4096")
    parser.add_argument("--max_tokens", type=int, default=48)
    args = parser.parse_args(argv)

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from zhlora.serving.app import Limits, build_app, start_in_thread
    from zhlora.serving.engine import load_engine

    engine = load_engine(args.model_path, [])
    server, port = start_in_thread(build_app(engine, Limits(max_tokens=256), api_key=None))
    profile = Path(tempfile.mkdtemp(prefix="zhlora-chromium-"))
    driver = open_browser(profile)
    try:
        wait = WebDriverWait(driver, 300)  # two answers from a 135M model on a CPU
        driver.get(f"http://127.0.0.1:{port}/")
        status = driver.find_element(By.ID, "status")
        wait.until(lambda d: status.get_attribute("data-state") == "ok")
        Select(driver.find_element(By.ID, "model")).select_by_value("default")
        for field, value in (("temperature", 0), ("max-tokens", args.max_tokens)):
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(str(value))
        driver.find_element(By.ID, "compare").click()
        box = driver.find_element(By.ID, "question")
        box.send_keys(args.question)
        box.send_keys("\n")
        began = time.perf_counter()
        left, right = wait.until(lambda d: answers_done(d, 2))
        print(f"base    : {left.find_element(By.CSS_SELECTOR, '.text').text}")
        print(f"adapter : {right.find_element(By.CSS_SELECTOR, '.text').text}")
        print(f"answered in {time.perf_counter() - began:.1f} s")
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        if not driver.save_screenshot(args.output):
            raise SystemExit(f"could not save {args.output}")
        print(f"screenshot -> {args.output}")
    finally:
        driver.quit()
        server.should_exit = True
        shutil.rmtree(profile, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
