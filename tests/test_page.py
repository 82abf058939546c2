"""The served page in headless Chromium: a submitted sentence renders its translation, the
step table and the cross-attention heatmap, all equal to the API's answer."""

import shutil

import httpx
import numpy as np
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait
from test_serve import make_server, serving

# Debian's packages; selenium is pointed at them so that it never downloads a browser.
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM and DRIVER, "install Debian's chromium and chromium-driver (.ci/run does)"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,1000"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    yield driver
    driver.quit()


def test_page_shows_translation_steps_and_attention(uninterrupted, browser, tmp_path):
    sentence = "ein mann fährt fahrrad"
    with serving(make_server(uninterrupted, max_wait_ms=1)) as url:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 60)
        assert browser.find_element(By.ID, "text").get_attribute("placeholder") == "我爱你"
        wait.until(lambda d: Select(d.find_element(By.ID, "model")).options)
        browser.find_element(By.ID, "text").send_keys(sentence)
        topk = browser.find_element(By.ID, "topk")
        topk.clear()
        topk.send_keys("3")
        browser.find_element(By.ID, "submit").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#heatmap rect.cell"))
        api = httpx.post(
            url + "/v1/translate",
            json=dict(text=sentence, attention=True, num_top=3),
            timeout=60,
        ).json()["translations"][0]

        assert browser.find_element(By.ID, "translation").text == api["text"]
        rows = browser.find_elements(By.CSS_SELECTOR, "#steps tbody tr")
        assert len(rows) == len(api["pieces"])
        for row, prob, alternatives in zip(rows, api["probs"], api["alternatives"], strict=True):
            cells = row.find_elements(By.TAG_NAME, "td")
            assert float(cells[2].text) == pytest.approx(prob, abs=6e-4)
            assert len(cells[3].find_elements(By.CLASS_NAME, "alt")) == len(alternatives) == 3

        cross = np.array(api["attention"]["cross"])  # [layers, heads, T, S]
        layers, heads, length, source = cross.shape

        def heatmap() -> np.ndarray:
            cells = browser.find_elements(By.CSS_SELECTOR, "#heatmap rect.cell")
            weights = [float(c.get_attribute("data-weight")) for c in cells]
            return np.array(weights).reshape(length, source)

        # The default view: the last layer, mean over heads.
        np.testing.assert_allclose(heatmap(), cross[-1].mean(0), atol=2e-4)
        head = Select(browser.find_element(By.ID, "head"))
        assert [o.text for o in head.options] == ["mean", *map(str, range(1, heads + 1))]
        head.select_by_value("1")
        np.testing.assert_allclose(heatmap(), cross[-1, 1], atol=2e-4)
        assert len(Select(browser.find_element(By.ID, "layer")).options) == layers
        assert browser.save_screenshot(str(tmp_path / "page.png"))
        assert (tmp_path / "page.png").stat().st_size > 0

        # A request the server refuses shows its message, not a broken page.
        text = browser.find_element(By.ID, "text")
        text.clear()
        text.send_keys("ein mann " * 40)
        browser.find_element(By.ID, "submit").click()
        wait.until(lambda d: d.find_element(By.ID, "error").text)
        assert "pieces long" in browser.find_element(By.ID, "error").text
