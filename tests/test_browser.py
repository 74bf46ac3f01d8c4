"""The MLflow UI compares a small sweep, checked in a real browser: headless Chromium driven by Playwright.

Three tiny runs go into a project's sqlite store, `mlflow server` serves it, and Chromium opens the experiment's runs
table and the compare view of the three runs. The compare view's screenshot stays in test-artifacts/mlflow_compare.png.

Slow, and it provisions what it drives the first time: Debian's `chromium` (apt-get, as root) and npm's
`playwright-core` (into pytest's cache folder). Where either cannot be had, the test skips and says what to install.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from PIL import Image

from helpers.config import REPO, TINY, make_config
from helpers.processes import running_mlflow_server
from helpers.stores import mlflow_client
from vaelab.stages.train import train
from vaelab.tracking.ui import experiment_links

pytestmark = pytest.mark.subprocess

CHROMIUM = Path("/usr/bin/chromium")  # Debian's `chromium` package
PLAYWRIGHT = "playwright-core@1.65.1"  # the library only: it drives the Chromium above, downloads no browser
ARTIFACTS = REPO / "test-artifacts"  # git-ignored; kept after the test for people (and CI) to look at
SCREENSHOT = ARTIFACTS / "mlflow_compare.png"
FAILED_SCREENSHOT = ARTIFACTS / "mlflow_compare_failed.png"  # the page as it was when a step timed out
METRIC = "val/elbo"
LATENT_DIMS = (2, 3, 4)

# Drives Chromium through MLflow's UI. argv[2]: the job (JSON); stdout: one JSON report, with `error` and `step`
# where a step failed. Every wait is on something the page shows, never a fixed sleep, except short settles after
# a re-layout.
DRIVER = r"""
const { chromium } = require('playwright-core');
const job = JSON.parse(process.argv[2]);
const timeout = job.timeout_ms;

async function open(page, url, texts) {
  // The SPA loads its data after its shell: wait for every text; if one never comes, reload once.
  for (let attempt = 1; ; attempt++) {
    try {
      await page.goto(url, { waitUntil: 'domcontentloaded', timeout });
      for (const text of texts) await page.getByText(text, { exact: true }).first().waitFor({ timeout });
      return;
    } catch (error) {
      if (attempt === 2) throw error;
    }
  }
}

async function choose(page, select, option) {
  // An antd multi-select: open it, type to filter, click the exact option.
  await select.click();
  await page.keyboard.type(option);
  await page.locator(`.du-bois-light-select-item-option[title="${option}"]`).first().click({ timeout });
  await page.keyboard.press('Escape');
}

(async () => {
  const report = {};
  const browser = await chromium.launch({
    executablePath: job.chromium, args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
  });
  const context = await browser.newContext({ viewport: { width: 1600, height: 1000 } });
  // MLflow's assistant panel opens itself on a first visit and would cover a third of the page.
  await context.addInitScript(() => {
    localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
    localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
  });
  const page = await context.newPage();
  try {
    report.step = 'the experiment runs table, from the link make ui prints';
    await open(page, job.runs_url, job.run_names);
    report.runs_page = await page.locator('body').innerText();
    report.runs_page_url = page.url();

    report.step = 'ticking all runs, then Compare';
    await page.locator('.ag-header .ag-checkbox-input').first().click({ force: true, timeout });  // select all
    await page.getByRole('button', { name: 'Compare', exact: true }).click({ timeout });
    await page.getByText(job.heading, { exact: true }).waitFor({ timeout });
    report.clicked_compare_url = page.url();

    report.step = 'the compare view';
    await open(page, job.compare_url, [job.heading, ...job.run_names]);
    await page.locator('.js-plotly-plot .main-svg').first().waitFor({ timeout });
    // The parallel-coordinates plot starts with the differing params and whichever metric comes first: make it
    // plot our params and metric.
    await page.getByRole('button', { name: 'Clear All' }).click();
    const selects = page.locator('.du-bois-light-select-selector');
    for (const param of job.params) await choose(page, selects.nth(0), param);
    await choose(page, selects.nth(1), job.metric);
    await page.locator('.js-plotly-plot text.axis-title', { hasText: job.metric }).first().waitFor({ timeout });
    const axes = page.locator('.js-plotly-plot text.axis-title');
    report.plot_axes = await axes.evaluateAll(titles => titles.map(title => title.textContent));
    for (const name of ['Parameters - Show diff only', 'Metrics - Show diff only']) {
      await page.getByRole('switch', { name }).click();
    }
    // The page scrolls inside <main>, so a full-page screenshot would stop at the window: grow the window instead.
    const height = await page.evaluate(() =>
      Math.max(...[...document.querySelectorAll('body, main')].map(element => element.scrollHeight)));
    await page.setViewportSize({ width: 1600, height: Math.min(Math.max(height + 40, 1000), 5000) });
    await page.waitForTimeout(1000);

    report.step = 'the metrics table';
    // Two virtualized grids side by side, metric names and values: scroll the values to the metric's row (the names
    // follow one scroll event late, so scroll in two steps) and read the row.
    const row = page.locator('.ReactVirtualized__Grid a', { hasText: job.metric }).first();
    await row.waitFor({ state: 'attached', timeout });
    const { index, top } = await page.evaluate(metric => {
      const grids = [...document.querySelectorAll('.ReactVirtualized__Grid')];
      const name = grids.flatMap(grid => [...grid.querySelectorAll('a')]).find(a => a.textContent.trim() === metric);
      let table = name.closest('.ReactVirtualized__Grid');
      while (table.querySelectorAll('.ReactVirtualized__Grid').length < 2) table = table.parentElement;
      const values = [...table.querySelectorAll('.ReactVirtualized__Grid')].pop();
      return { index: grids.indexOf(values), top: name.parentElement.style.top };
    }, job.metric);
    const values = page.locator('.ReactVirtualized__Grid').nth(index);
    await values.hover();
    await page.mouse.wheel(0, parseFloat(top) - 1);
    await page.waitForTimeout(300);
    await page.mouse.wheel(0, 1);
    await page.waitForTimeout(500);
    report.metric_values = await values.evaluate((grid, top) =>
      [...grid.querySelectorAll('.ReactVirtualized__Grid__innerScrollContainer > div')]
        .filter(cell => cell.style.top === top)
        .sort((a, b) => parseFloat(a.style.left) - parseFloat(b.style.left))
        .map(cell => cell.textContent.trim()), top);
    report.compare_page = await page.locator('body').innerText();

    report.step = 'the screenshot';
    await page.mouse.move(0, 0);  // no hover highlight
    await page.screenshot({ path: job.screenshot, fullPage: true });
    delete report.step;
  } catch (error) {
    report.error = String(error);
    await page.screenshot({ path: job.failed_screenshot, fullPage: true }).catch(() => {});
  } finally {
    await browser.close();
  }
  process.stdout.write(JSON.stringify(report));
})();
"""


def compact(value) -> str:
    return json.dumps(value, separators=(",", ":"))


def tail(done: subprocess.CompletedProcess) -> str:
    return plain(done.stdout[-1500:] + "\n" + done.stderr[-1500:]).strip()


def plain(text: str) -> str:
    """Without terminal colour codes (Playwright's call logs have them)."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's headless-capable Chromium; installed with apt-get when missing and we are root."""
    if not CHROMIUM.exists() and os.geteuid() == 0 and shutil.which("apt-get"):
        done = subprocess.run(
            "apt-get update -qq && DEBIAN_FRONTEND=noninteractive "
            "apt-get install -y -qq -o DPkg::Lock::Timeout=300 chromium",
            shell=True,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if done.returncode != 0 and not CHROMIUM.exists():
            pytest.skip(f"apt-get could not install chromium (install Debian's `chromium` package):\n{tail(done)}")
    if not CHROMIUM.exists():
        pytest.skip(f"headless Chromium is needed at {CHROMIUM}: install Debian's `chromium` package (as root)")
    return CHROMIUM


@pytest.fixture(scope="session")
def playwright(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """npm's playwright-core, installed once into pytest's cache folder; returns its node_modules folder."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not (node and npm):
        pytest.skip("Node.js and npm drive the browser: install them (Debian: apt-get install nodejs npm)")
    cache = getattr(request.config, "cache", None)
    folder = cache.mkdir("playwright") if cache else tmp_path_factory.mktemp("playwright")
    installed = folder / "node_modules" / "playwright-core" / "package.json"
    wanted = PLAYWRIGHT.rpartition("@")[2]
    with open(folder / ".lock", "w") as lock:  # one npm install at a time, should two pytest sessions start at once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not installed.exists() or json.loads(installed.read_text())["version"] != wanted:
            done = subprocess.run(
                [npm, "install", "--prefix", str(folder), "--no-audit", "--no-fund", "--ignore-scripts",
                 "--loglevel=error", PLAYWRIGHT],
                capture_output=True,
                text=True,
                timeout=300,
                env={**os.environ, "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1", "NPM_CONFIG_UPDATE_NOTIFIER": "false"},
            )  # fmt: skip
            if done.returncode != 0 or not installed.exists():
                pytest.skip(
                    f"npm could not install {PLAYWRIGHT} (is the npm registry reachable?); "
                    f"run `npm install --prefix {folder} {PLAYWRIGHT}`:\n{tail(done)}"
                )
    return folder / "node_modules"


def drive(job: dict, playwright: Path, tmp_path: Path) -> dict:
    script = tmp_path / "drive_mlflow_ui.js"
    script.write_text(DRIVER)
    done = subprocess.run(
        [shutil.which("node"), str(script), json.dumps(job)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NODE_PATH": str(playwright)},
    )
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"the browser driver failed ({done.returncode}):\n{tail(done)}")
    if "error" in report:
        pytest.fail(f"in {report['step']}: {plain(report['error'])}\n(the page as it was: {FAILED_SCREENSHOT})")
    return report


@pytest.mark.slow
def test_the_mlflow_ui_compares_three_runs_in_a_real_browser(
    project: Path, chromium: Path, playwright: Path, tmp_path: Path
):
    names = [f"latent-{dim}" for dim in LATENT_DIMS]
    for dim, name in zip(LATENT_DIMS, names, strict=True):
        overrides = (f"model.latent_dim={dim}", f"tracking.run_name={name}", "tracking.system_metrics=false")
        train(make_config(*TINY, *overrides))
    client = mlflow_client(project)
    experiment = client.get_experiment_by_name("vaelab").experiment_id
    runs = {run.info.run_name: run for run in client.search_runs([experiment])}
    assert sorted(runs) == names
    run_ids = [runs[name].info.run_id for name in names]

    ARTIFACTS.mkdir(exist_ok=True)
    SCREENSHOT.unlink(missing_ok=True)  # a screenshot left by an earlier run proves nothing
    FAILED_SCREENSHOT.unlink(missing_ok=True)
    store = f"sqlite:///{project / 'mlflow.db'}"
    with running_mlflow_server(store, project / "mlartifacts", tmp_path / "server.log") as uri:
        report = drive(
            {
                "chromium": str(chromium),
                "timeout_ms": 60_000,
                # The experiment's link as `make ui` prints it: it must open on the runs table, not on MLflow's
                # GenAI overview with the runs under "Evaluation runs".
                "runs_url": next(link.url for link in experiment_links(store, uri) if link.name == "vaelab"),
                # MLflow's own link to the view (getCompareRunPageRoute): JSON lists of run and experiment ids.
                "compare_url": f"{uri}/#/compare-runs?runs={compact(run_ids)}&experiments={compact([experiment])}"
                "&workflowType=machine_learning",
                "heading": f"Comparing {len(run_ids)} Runs from 1 Experiment",
                "run_names": names,
                "params": ["model.latent_dim", "tracking.run_name"],
                "metric": METRIC,
                "screenshot": str(SCREENSHOT),
                "failed_screenshot": str(FAILED_SCREENSHOT),
            },
            playwright,
            tmp_path,
        )

    # The experiment's runs table lists the three runs; the compare view shows them with the metric, in the
    # parallel-coordinates plot and in the metrics table, with the values the store holds (in the URL's run order).
    assert all(name in report["runs_page"] for name in names), report["runs_page"][:2000]
    assert "/traces" not in report["runs_page_url"] and "Evaluation runs" not in report["runs_page"]
    clicked = parse_qs(urlsplit(unquote(urlsplit(report["clicked_compare_url"]).fragment)).query)
    assert sorted(json.loads(clicked["runs"][0])) == sorted(run_ids)  # the UI's Compare button opens our URL
    assert json.loads(clicked["experiments"][0]) == [experiment]
    assert all(name in report["compare_page"] for name in names) and METRIC in report["compare_page"]
    assert report["plot_axes"] == ["model.latent_dim", "tracking.run_name", METRIC]
    shown = [float(value.replace("\N{MINUS SIGN}", "-")) for value in report["metric_values"]]
    stored = [runs[name].data.metrics[METRIC] for name in names]
    assert len(shown) == len(stored), report["metric_values"]
    assert all(math.isclose(a, b, rel_tol=1e-3, abs_tol=5e-3) for a, b in zip(shown, stored, strict=True)), shown

    # The screenshot is a real, full page: a PNG of the window's width and more, far from blank.
    assert SCREENSHOT.stat().st_size > 20_000
    with Image.open(SCREENSHOT) as image:
        image.verify()
    with Image.open(SCREENSHOT) as image:
        assert image.format == "PNG" and image.width >= 1600 and image.height >= 1000
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 200
