"""`sar-scale dashboard` serves the training run in a real browser (headless Debian Chromium).

The run is written by the training tracker itself (SQLite store + file artifacts, as a training
run leaves them), the dashboard is the real CLI in a subprocess, and Chromium (driven by
selenium) must render the run, its loss chart and the logged sample image. Screenshots are kept
in the test's tmp dir (printed). Skipped, with the reason, where Chromium cannot start.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from sar_scale.dashboard import MODEL_TRAINING_VIEW, find_store
from sar_scale.training.tracking import dashboard_key

pytestmark = pytest.mark.integration

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
REPO = Path(__file__).resolve().parents[2]


def _browser(tmp: Path):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip(f"no Chromium here ({CHROMIUM}, {CHROMEDRIVER} missing): run `bash scripts/setup_system.sh`")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError as e:
        pytest.skip(f"selenium is not installed: {e}")
    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1000", f"--user-data-dir={tmp / 'chrome-profile'}"):
        opts.add_argument(flag)
    try:
        return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    except Exception as e:  # noqa: BLE001 - any start failure means "cannot run here", with the reason
        print(f"SKIP reason: Chromium could not start: {e}")
        pytest.skip(f"Chromium could not start here: {str(e).splitlines()[0]}")


def _training_run(run_dir: Path) -> tuple[str, str]:
    from sar_scale.training.tracking import Tracker

    run_dir.mkdir(parents=True)
    tr = Tracker(True, run_dir, experiment="sar-scale-demo", run_name="dash-test")
    run_id = tr.start(None, {"model": {"name": "demo"}, "seed": 0})
    for step in range(1, 31):  # what the trainer logs, then what `sar-scale eval` adds to the run
        m = {"loss": 6.0 / step ** 0.5, "lr": 1e-3, "grad_norm": 1.0, "stage": 0, "resolution": 64,
             "step_time_s": 0.1, "data_wait_s": 0.01, "tokens_per_s": 100.0, "samples_per_s": 3.0,
             "flops_per_s": 1e9, "mfu": 0.3, "loss/s64": 6.0 / step ** 0.5, "loss/bucket_4x4": 5.0}
        tr.log_metrics({dashboard_key(k): v for k, v in m.items()}, step)
    tr.log_metrics({f"eval/nll/{p}": 3.0 for p in ("ar", "mar-8", "random-16-cosine")}, 30)
    tr.log_metrics({f"eval/shapes/{p}/all": 0.5 for p in ("ar", "mar-8")}, 30)
    img = Image.new("RGB", (96, 32), (240, 240, 240))
    img.paste((220, 35, 35), (10, 8, 26, 24))
    tr.log_image(img, "samples/s64_step00000030.png")
    tr.end()
    return run_id, "samples/s64_step00000030.png"


def _read_url(proc: subprocess.Popen, timeout: float = 300.0) -> tuple[str, str]:
    url = run_url = None
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline and proc.poll() is None:
        line = proc.stdout.readline()
        lines.append(line)
        if line.startswith("MLflow UI: "):
            url = line.split(": ", 1)[1].strip()
        if line.startswith("newest run: "):
            run_url = line.split(": ", 1)[1].strip()
        if "Ctrl-C" in line:
            break
    assert url and run_url, f"dashboard printed no URL: {''.join(lines)}"
    return url, run_url


def _port_open(url: str) -> bool:
    host, port = url.split("//")[1].split(":")
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, int(port))) == 0


def test_dashboard_shows_run_loss_chart_and_sample_image(tmp_path):
    driver = _browser(tmp_path)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    work = tmp_path / "demo"
    run_id, image_key = _training_run(work / "train")
    assert find_store(work).endswith("train/mlflow.db")
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(find_store(work)).get_experiment_by_name("sar-scale-demo")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # MLflow's model-training view
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sar_scale.cli", "dashboard", "--workdir", str(work)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
    shots = []
    try:
        url, run_url = _read_url(proc)
        assert url.startswith("http://127.0.0.1:") and run_id in run_url
        wait = WebDriverWait(driver, 150)

        def visible_text(text: str):
            return lambda d: [e for e in d.find_elements(By.XPATH, f"//*[normalize-space(text())='{text}']")
                              if e.is_displayed()]

        # the printed link opens the run's charts in the model-training view, training charts first:
        # the loss chart (a Plotly chart titled "loss", the run's trace in its legend) with no scrolling
        assert run_url.endswith(f"/model-metrics?{MODEL_TRAINING_VIEW}")
        driver.get(run_url)
        wait.until(visible_text("dash-test"))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot svg.main-svg"))
        wait.until(visible_text("loss"))
        wait.until(lambda d: "dash-test (1-train/loss)" in d.find_element(By.TAG_NAME, "body").text)
        assert driver.find_elements(By.CSS_SELECTOR, ".js-plotly-plot .scatterlayer .trace")
        assert [e for e in driver.find_elements(By.XPATH, "//*[normalize-space(text())='Model training']")
                if e.is_displayed()], "not the model-training view"
        time.sleep(2)  # the sections settle their layout after the first chart draws
        chart = visible_text("loss")(driver)[0]
        top, bottom, view = driver.execute_script(
            "const r = arguments[0].getBoundingClientRect(); return [r.top, r.bottom, window.innerHeight]", chart)
        assert 0 <= top and bottom + 300 <= view, f"loss chart title at {top}-{bottom}px, window {view}px"
        sections = [e.text for e in driver.find_elements(By.XPATH, "//*[contains(text(), '-train') or "
                    "starts-with(normalize-space(text()), 'eval/')]") if e.is_displayed()]
        assert sections and sections[0].startswith("1-train"), sections
        shots.append(tmp_path / "dashboard_loss_chart.png")
        driver.save_screenshot(str(shots[-1]))
        # the logged sample image, previewed from the artifact store (decoded: naturalWidth = 96)
        driver.get(run_url.split("/model-metrics")[0] + "/artifacts")
        folder, name = image_key.split("/")
        wait.until(visible_text(folder))[0].click()
        wait.until(visible_text(name))[0].click()
        wait.until(lambda d: [i for i in d.find_elements(By.TAG_NAME, "img")
                              if d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i) == 96])
        shots.append(tmp_path / "dashboard_sample_image.png")
        driver.save_screenshot(str(shots[-1]))
        print("screenshots:", *map(str, shots))
        # Ctrl-C stops the UI and its server
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert not _port_open(url)
    finally:
        driver.quit()
        if proc.poll() is None:  # a failed check: stop it the way a user would, kill only as a last resort
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    assert all(p.stat().st_size > 10_000 for p in shots)
    out = os.environ.get("SAR_SCALE_TEST_ARTIFACTS")
    if out:  # CI keeps the screenshots
        Path(out).mkdir(parents=True, exist_ok=True)
        for p in shots:
            shutil.copy(p, Path(out) / p.name)


def test_server_dies_with_a_killed_cli(tmp_path):
    """SIGKILL of the dashboard CLI (no handler can run) still stops the MLflow server."""
    _training_run(tmp_path / "w" / "train")
    proc = subprocess.Popen([sys.executable, "-m", "sar_scale.cli", "dashboard", "--workdir", str(tmp_path / "w")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url, _ = _read_url(proc)
        assert _port_open(url)
    finally:
        proc.kill()
        proc.wait(10)
    deadline = time.monotonic() + 30
    while _port_open(url) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _port_open(url)


def test_dashboard_cli_errors(tmp_path):
    from sar_scale.dashboard import main

    assert main(["--workdir", str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["--workdir", str(tmp_path / "empty")]) == 2
