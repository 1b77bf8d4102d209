"""The web dashboard in a real headless Chromium (Debian's chromium + chromedriver, driven by Selenium):
sign in, upload and submit from the page, watch the job go live to ``succeeded``, and find the metrics
table, the charts, the per-layer table and the artifacts rendered."""
from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from testkit.stack import tiny_classifier

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=1400,1800"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        msg = "Debian's chromium and chromium-driver are not installed (make setup installs them)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for f in FLAGS:
        opts.add_argument(f)
    opts.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for(driver, js: str, timeout: float = 30, what: str = ""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = driver.execute_script(js)
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"{what or js} not true after {timeout}s; page: {driver.current_url}")


def test_dashboard_submit_watch_and_charts(stack, browser, tmp_path):
    from selenium.webdriver.common.by import By

    onnx_path, npz_path = tiny_classifier(tmp_path)
    d = browser
    d.get(stack.url + "/dashboard")
    assert d.find_element(By.ID, "signin-view").is_displayed()

    # a wrong key is refused, the right one signs in and is kept in localStorage
    d.find_element(By.ID, "key").send_keys("nc_wrong")
    d.find_element(By.ID, "signin").click()
    wait_for(d, "return document.querySelector('#signin-error').textContent.includes('refused')", what="401 shown")
    d.find_element(By.ID, "key").clear()
    d.find_element(By.ID, "key").send_keys(stack.key)
    d.find_element(By.ID, "signin").click()
    wait_for(d, "return !document.querySelector('#jobs-view').hidden", what="jobs view")
    assert d.execute_script("return localStorage.getItem('netcompress.key')") == stack.key

    # upload + submit from the page
    d.get(stack.url + "/dashboard#/submit")
    wait_for(d, "return !document.querySelector('#submit-view').hidden", what="submit view")
    d.find_element(By.ID, "model-file").send_keys(str(onnx_path))
    d.find_element(By.ID, "data-file").send_keys(str(npz_path))
    spec = {"steps": [{"method": "prune", "granularity": "weight", "sparsity": 0.5},
                      {"method": "quantize", "scheme": "int8", "mode": "static"}],
            "eval": {"holdout": 0.3, "latency_runs": 5}}
    d.execute_script("document.querySelector('#spec').value = arguments[0]", json.dumps(spec))
    d.find_element(By.ID, "job-name").send_keys("from-the-browser")
    # record every status the detail badge shows, to see it go live rather than jump to the end
    d.execute_script("""
        window.__badges = [];
        new MutationObserver(() => window.__badges.push(document.querySelector('#detail-badge').textContent))
          .observe(document.querySelector('#detail-badge'), {childList: true, characterData: true, subtree: true});
    """)
    # the worker holds the job as its second step begins until the page shows it running: it cannot finish
    # before the page has caught up with it
    with stack.paused("phase:quantizing"):
        d.find_element(By.ID, "submit-btn").click()
        job_id = wait_for(d, "const m = location.hash.match(/^#\\/jobs\\/([0-9a-f]+)$/); return m && m[1]",
                          timeout=60, what="navigated to the job")
        wait_for(d, "return document.querySelector('#detail-badge').textContent === 'running'", timeout=150,
                 what="the job shown running")
    wait_for(d, f"return document.body.dataset.rendered === '{job_id}'", timeout=150, what="job finished and rendered")

    badges = d.execute_script("return window.__badges")
    assert badges[-1] == "succeeded" and ({"queued", "running"} & set(badges)), badges
    assert d.find_element(By.ID, "detail-badge").text == "succeeded"
    assert d.find_element(By.ID, "detail-message").text.startswith("succeeded in ")
    job = stack.client().get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["name"] == "from-the-browser"

    # the verdict comes first, above the status and the table: the server's words for the result
    verdict = d.find_element(By.ID, "detail-verdict")
    assert verdict.is_displayed() and verdict.text == job["metrics"]["result"]["verdict"]["summary"]
    assert ("smaller" in verdict.text or "larger" in verdict.text) and "at batch 1" in verdict.text
    assert "budget 5 pt" in verdict.text
    assert verdict.location["y"] < d.find_element(By.ID, "metrics-table").location["y"]
    assert verdict.location["y"] < d.find_element(By.ID, "detail-status").location["y"]

    # metrics table: original, two steps, result; the result column shows the server's file size
    heads = [th.text for th in d.find_elements(By.CSS_SELECTOR, "#metrics-table thead th")]
    assert heads[:5] == ["metric", "original", "1. prune", "2. quantize", "result"], heads
    rows = {tr.find_elements(By.TAG_NAME, "td")[0].text: tr for tr in d.find_elements(By.CSS_SELECTOR, "#metrics-table tbody tr")}
    assert {"file size", "nonzero params", "latency p50 (ms)", "accuracy"} <= set(rows)
    ratio = job["metrics"]["result"]["ratios"]["nonzero_params"]
    assert rows["nonzero params"].text.endswith(f"{ratio:.2f}×")

    # charts: points for the original and this job (highlighted), bars for original + each step
    pareto = d.execute_script("""const s = document.querySelector('#chart-pareto');
        return {points: s.querySelectorAll('circle').length, current: s.querySelectorAll('circle.current').length,
                width: s.getBoundingClientRect().width, texts: s.querySelectorAll('text').length};""")
    assert pareto["points"] >= 2 and pareto["current"] == 1 and pareto["width"] > 100 and pareto["texts"] >= 6
    bars = d.execute_script("return [...document.querySelectorAll('#chart-latency rect.lat-bar')]"
                            ".map(r => +r.getAttribute('height'))")
    assert len(bars) == 3 and all(h > 0 for h in bars), bars

    # per-layer sparsity from report.json, artifact links
    layer_rows = d.find_elements(By.CSS_SELECTOR, "#layers table[data-step='0'] tbody tr")
    assert {r.find_elements(By.TAG_NAME, "td")[0].text for r in layer_rows} == {"fc1", "fc2"}
    assert all("%" in r.text for r in layer_rows)
    links = {a.get_attribute("data-artifact") for a in d.find_elements(By.CSS_SELECTOR, "#artifacts a")}
    assert links == {a["name"] for a in job["artifacts"]}
    d.save_screenshot(str(tmp_path / "job.png"))

    # the jobs list shows it, live-updated, with its status
    d.get(stack.url + "/dashboard#/")
    wait_for(d, f"return document.querySelector('tr[data-job=\"{job_id}\"] .badge')?.textContent === 'succeeded'",
             what="job row")
    severe = [e for e in d.get_log("browser") if e["level"] == "SEVERE" and "favicon" not in e["message"]
              and "401" not in e["message"]]
    assert severe == [], severe

    # the jobs list gives each finished job's key ratios in words, the verdict on hover
    d.get(stack.url + "/dashboard#/")
    cell = wait_for(d, f"const c = document.querySelector('#jobs-table tr[data-job=\"{job_id}\"] td.result'); "
                       "return c && c.textContent !== '–' && [c.textContent, c.title]", what="the job's result cell")
    ratios = job["metrics"]["result"]["ratios"]
    size = ratios["file_bytes"]
    assert (f"{size:.2f}× smaller" if size >= 1 else f"{1 / size:.2f}× larger") in cell[0], cell
    assert "budget" in cell[0] and cell[1] == job["metrics"]["result"]["verdict"]["summary"]


def test_dashboard_shows_a_search_front(stack, browser, tmp_path):
    """A search job: the chart plots its candidates and front, the table lists the front's downloads."""
    from selenium.webdriver.common.by import By

    from testkit.stack import upload, wait_job

    onnx_path, npz_path = tiny_classifier(tmp_path / "s", samples=1000)
    c = stack.client()
    ids = [upload(c, path)["id"] for path in (onnx_path, npz_path)]
    spec = {"steps": [{"method": "prune", "sparsity": 0.5}], "search": {"prune.sparsity": [0.2, 0.5, 0.8]},
            "target": {"metric": "agreement", "max_accuracy_drop": 0.2}, "eval": {"latency_runs": 5}}
    r = c.post("/v1/jobs", json={"model_id": ids[0], "dataset_id": ids[1], "spec": spec})
    job = wait_job(c, r.json()["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    s = job["metrics"]["search"]
    d = browser
    d.get(stack.url + "/dashboard")
    d.execute_script("localStorage.setItem('netcompress.key', arguments[0])", stack.key)
    d.get(stack.url + f"/dashboard#/jobs/{job['id']}")
    d.refresh()
    wait_for(d, f"return document.body.dataset.rendered === '{job['id']}'", what="search job rendered")
    dots = d.find_elements(By.CSS_SELECTOR, "#chart-pareto circle[data-candidate]")
    assert len(dots) == s["finished"] + 1  # every candidate and the original
    best = d.find_elements(By.CSS_SELECTOR, "#chart-pareto circle.current")
    assert [b.get_attribute("data-candidate") for b in best] == [s["best"]["id"]]
    rows = d.find_elements(By.CSS_SELECTOR, "#search-front-table tbody tr")
    assert [r.get_attribute("data-candidate") for r in rows] == s["front"]
    assert d.find_element(By.ID, "chart-pareto-caption").text.startswith(f"Search: {s['finished']} of 3 candidates")
    links = [a.get_attribute("data-artifact") for a in d.find_elements(By.CSS_SELECTOR, "#search-front-table a")]
    assert links and all(name.startswith("front-") for name in links)


def test_dashboard_submit_builds_the_dataset_from_a_folder_of_images(stack, browser, tmp_path):
    """The submit page takes a folder of pictures (issue 16): the browser decodes them, builds the float32 array
    named after the model's input at its fixed size, labels from the sub-folders, and uploads it as an .npz.
    The crops are 64×64, the model's size, so nothing is resampled and the pixels must match PIL's decode."""
    import numpy as np
    from PIL import Image
    from selenium.webdriver.common.by import By

    from testkit.images import conv_model, photo_crops

    folder = tmp_path / "crops"
    expected = photo_crops(folder, crop=64)
    model = conv_model(tmp_path / "conv.onnx")
    d = browser
    d.get(stack.url + "/dashboard")
    d.execute_script("localStorage.setItem('netcompress.key', arguments[0])", stack.key)
    d.get(stack.url + "/dashboard#/submit")
    d.refresh()  # the page reads the key when it loads
    wait_for(d, "return !document.querySelector('#submit-view').hidden", what="submit view")
    d.find_element(By.ID, "model-file").send_keys(str(model))
    d.find_element(By.ID, "images-dir").send_keys(str(folder))
    d.find_element(By.ID, "images-labels").click()
    d.execute_script("document.querySelector('#spec').value = arguments[0]",
                     json.dumps({"steps": [{"method": "quantize", "scheme": "fp16"}], "eval": {"latency_runs": 5}}))
    d.find_element(By.ID, "job-name").send_keys("images-from-the-browser")
    d.find_element(By.ID, "submit-btn").click()
    job_id = wait_for(d, "const m = location.hash.match(/^#\\/jobs\\/([0-9a-f]+)$/); return m && m[1]", timeout=60,
                      what=f"navigated to the job (status: {d.find_element(By.ID, 'submit-status').text})")
    job = stack.client().get(f"/v1/jobs/{job_id}").json()
    ds = stack.client().get(f"/v1/datasets/{job['dataset_id']}").json()
    assert ds["samples"] == 20 and ds["arrays"]["images"] == {"shape": [20, 3, 64, 64], "dtype": "float32"}, ds
    assert "0=china" in ds["name"] and "1=flower" in ds["name"], ds["name"]
    stored = np.load(stack.home / "artifacts" / "datasets" / ds["id"] / "data.npz")
    order = sorted(expected)
    assert stored["labels"].tolist() == [0 if expected[p] == "china" else 1 for p in order]
    x = stored["images"]
    pil = np.stack([np.asarray(Image.open(p).convert("RGB"), np.float32).transpose(2, 0, 1) / 255 for p in order])
    assert np.abs(x - pil).mean() < 2 / 255, np.abs(x - pil).mean()  # two JPEG decoders, scaled by 1/255
    assert 0.0 <= x.min() and x.max() <= 1.0
    wait_for(d, f"return document.body.dataset.rendered === '{job_id}'", timeout=150, what="job finished and rendered")
    assert stack.client().get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"
