"""The chat page of `zhlora serve` (zhlora/web/), driven in headless Chromium through Selenium:
enter the API key, ask, watch the answer stream in, switch adapter, compare base and adapter,
and save a screenshot.

Needs Debian's chromium and chromium-driver (`apt-get install chromium chromium-driver`) and
the `selenium` package; skipped without them. Nothing is downloaded: Selenium is pointed at
/usr/bin/chromedriver and /usr/bin/chromium, and the browser runs with networking extras off.
Answers are greedy (temperature 0), so the page must show exactly what the API returns.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
    pytest.skip("Chromium not installed: apt-get install -y chromium chromium-driver", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
openai = pytest.importorskip("openai")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from zhlora.serving.app import Limits, build_app, start_in_thread  # noqa: E402
from zhlora.serving.engine import load_engine  # noqa: E402

KEY = "web-test-key"
QUESTION = "把1234写成中文数字"
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def base_url(tiny_run_dir):
    engine = load_engine(tiny_run_dir, [("math", tiny_run_dir)])
    server, port = start_in_thread(build_app(engine, Limits(max_tokens=64), api_key=KEY))
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True


@pytest.fixture
def browser(tmp_path):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)


def api_answer(base_url: str, model: str) -> str:
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0)
    answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}],
                                            temperature=0, max_tokens=MAX_TOKENS)
    return answer.choices[0].message.content.rstrip()  # the page trims the end of a finished answer


def answers_done(driver, count: int):
    bubbles = driver.find_elements(By.CSS_SELECTOR, ".bubble.assistant")
    return len(bubbles) == count and all(b.get_attribute("data-state") == "done" for b in bubbles) and bubbles


def ask(driver, text: str) -> None:
    box = driver.find_element(By.ID, "question")
    box.send_keys(text)
    box.send_keys("\n")  # Enter sends


def set_number(driver, element_id: str, value) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(str(value))


def test_chat_page(base_url, browser, tmp_path):
    wait = WebDriverWait(browser, 20)
    browser.get(base_url + "/")
    status = browser.find_element(By.ID, "status")
    wait.until(lambda d: status.get_attribute("data-state") == "error")  # no key yet: told to give one
    assert "API key" in status.text

    browser.find_element(By.ID, "api-key").send_keys(KEY + "\t")  # Tab commits the field: models load
    wait.until(lambda d: status.get_attribute("data-state") == "ok")
    picker = Select(browser.find_element(By.ID, "model"))
    assert [o.get_attribute("value") for o in picker.options] == ["base", "default", "math"]
    assert picker.first_selected_option.get_attribute("value") == "default"  # an adapter, not base
    set_number(browser, "temperature", 0)
    set_number(browser, "max-tokens", MAX_TOKENS)

    # 1. a streamed answer from the run's adapter
    ask(browser, QUESTION)
    first = wait.until(lambda d: answers_done(d, 1))[0]
    assert first.find_element(By.CSS_SELECTOR, ".who").text == "default"
    assert first.find_element(By.CSS_SELECTOR, ".text").text == api_answer(base_url, "default")
    assert int(first.get_attribute("data-chunks")) > 1  # it arrived in pieces
    assert "tokens" in first.find_element(By.CSS_SELECTOR, ".meta").text

    # 2. switch to base mid-conversation: the next answer comes from the base model
    picker.select_by_value("base")
    ask(browser, QUESTION)
    second = wait.until(lambda d: answers_done(d, 2))[1]
    assert second.find_element(By.CSS_SELECTOR, ".who").text == "base"
    assert second.find_element(By.CSS_SELECTOR, ".text").text  # its own (multi-turn) answer

    # 3. compare: base and the chosen adapter side by side, for one question
    picker.select_by_value("default")
    browser.find_element(By.ID, "compare").click()
    panes = browser.find_elements(By.CSS_SELECTOR, ".pane")
    assert [p.get_attribute("data-model") for p in panes] == ["base", "default"]
    ask(browser, QUESTION)
    left, right = wait.until(lambda d: answers_done(d, 2))
    assert left.find_element(By.CSS_SELECTOR, ".text").text == api_answer(base_url, "base")
    assert right.find_element(By.CSS_SELECTOR, ".text").text == api_answer(base_url, "default")
    assert left.find_element(By.CSS_SELECTOR, ".text").text != right.find_element(By.CSS_SELECTOR, ".text").text

    shot = tmp_path / "chat.png"
    assert browser.save_screenshot(str(shot))
    from PIL import Image

    with Image.open(shot) as image:
        assert image.format == "PNG" and image.width >= 1000 and image.height >= 600
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 50  # text and colour, not a blank
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "401" not in e["message"]]
    assert errors == []  # nothing failed to load (the page fetches nothing from elsewhere)
