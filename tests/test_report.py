"""plait report: one self-contained HTML page of one run or several, checked as HTML and in
a real headless browser (Chromium through chromedriver)."""

import base64
import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from plait.cli import main
from plait.telemetry.plots import plot_metrics
from plait.telemetry.report import ReportError, default_report_path, render_report, write_report

SECTION_IDS = ("header", "nav", "summary", "config", "curves", "timeline", "eval-suites",
               "bias-probes", "plots")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HOSTILE = "<script>alert('x')</script>"


def _fake_run(root: Path, name: str, *, lr: float = 1e-5, shift: float = 0.0) -> Path:
    """A run directory holding what plait train writes, plus eval and bias results."""
    run = root / name
    run.mkdir(parents=True)
    config = {"run": {"dir": str(run)}, "algo": {"name": "grpo", "kl_coef": 0.05},
              "optim": {"lr": lr, "warmup_steps": 0}, "data": {"task": "addition"},
              "train": {"steps": 6, "eval_every": 3}}
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    records = [{"step": 0, "time": 1.7e9, "eval/accuracy": 0.1, "eval/reward": 0.1}]
    for step in range(1, 7):
        record = {"step": step, "time": 1.7e9 + step, "reward/mean": 0.1 * step + shift,
                  "train/accuracy": 0.08 * step + shift, "kl_ref": (0.01 + shift) * step,
                  "policy/entropy": 1.5 - (0.05 + shift) * step,
                  "response_length/mean": 5.0 + step * (1 + 10 * shift),
                  "loss/policy": 0.1 / step + shift, "eval/accuracy/addition": 0.5}
        if step % 3 == 0:
            record.update({"eval/accuracy": 0.1 * step + shift,
                           "eval/suite1/greedy_accuracy": 0.05 * step + shift,
                           "eval/suite1/pass@1": 0.04 * step + shift,
                           "eval/suite1/pass@4": 0.1 * step + shift,
                           "eval/suite1/mean_length": 6.0})
        records.append(record)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    timeline = [{"step": step, "spans": [["generate", 0.0, 0.1], ["reward", 0.05, 0.06],
                                         ["reward", 0.07, 0.08], ["update", 0.11, 0.2]]}
                for step in range(1, 7)]
    (run / "timeline.jsonl").write_text("".join(json.dumps(t) + "\n" for t in timeline))
    (run / "summary.json").write_text(json.dumps({
        "algo": "grpo", "steps": 6, "accuracy_after": 0.6 + shift, "device": "cpu",
        "model_state_mb_per_rank": {"parameters": 3.0, "optimizer": 6.0}}))
    suites = {"suite1": {"num_prompts": 50, "greedy_accuracy": 0.3, "pass@1": 0.25,
                         "pass@4": 0.5, "maj@4": 0.35, "mean_reward": 0.3, "mean_length": 6.1,
                         "truncation_rate": 0.0},
              "suite<2>": {"num_prompts": 20, "pass@8": 0.9}}
    (run / "eval_results.json").write_text(json.dumps([
        {"model": HOSTILE, "checkpoint": None, "step": None, "time": 1.7e9, "suites": suites},
        {"model": "tuned", "checkpoint": str(run / "checkpoints" / "step_6"), "step": 6,
         "time": 1.7e9 + 60, "suites": {"suite1": {"greedy_accuracy": 0.5, "pass@4": 0.7}}}]))
    def conditions(tuned):
        return {cond: {"accuracy": 0.6 + i / 10, "accuracy_ambiguous": 0.5,
                       "bias_ambiguous": 0.25 - i * 0.07 + shift - tuned * 0.05,
                       "bias_disambiguated": 0.12 - i * 0.03 + tuned * 0.02,
                       "num_items": 100}
                for i, cond in enumerate(("Q", "Q+IF", "Q+IF+CoT"))}

    (run / "bias_results.json").write_text(json.dumps([
        {"model": "base", "label": "base", "time": 1.7e9, "conditions": conditions(0)},
        {"model": "tuned", "label": "tuned", "time": 1.7e9 + 60, "conditions": conditions(1)}]))
    plot_metrics(records, run / "metrics.png", title=name)
    return run


class _Page(HTMLParser):
    """The elements' ids, every src and href, the images' sources, and the tags seen."""

    def __init__(self, text: str):
        super().__init__()
        self.ids, self.links, self.images, self.tags = [], [], [], set()
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        self.links += [value for key, value in attrs.items() if key in ("src", "href")]
        if tag == "img":
            self.images.append(attrs.get("src", ""))


def _section(page: str, section_id: str) -> str:
    """The section's HTML, without the line-break hints of table headers."""
    found = re.search(rf'<section id="{section_id}">(.*?)</section>', page, re.S)
    assert found, f"no section {section_id}"
    return found.group(1).replace("<wbr>", "")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    return [_fake_run(root, "run_a"), _fake_run(root, "run_b", lr=3e-5, shift=0.05)]


@pytest.fixture(scope="module")
def compared(runs, tmp_path_factory) -> Path:
    """The report comparing the two runs."""
    return write_report(runs, tmp_path_factory.mktemp("report") / "compare.html")


def test_report_of_one_run_has_every_section(runs):
    out = write_report(runs[:1])
    assert out == runs[0] / "report.html" == default_report_path(runs[:1])
    text = out.read_text()
    page = _Page(text)
    assert set(SECTION_IDS) <= set(page.ids)
    assert "notes" not in page.ids and "could not be drawn" not in text  # every file read
    assert len(page.ids) == len(set(page.ids))
    # self-contained: images embedded as PNG data URIs, links only within the page
    assert page.images and all(src.startswith("data:image/png;base64,") for src in page.images)
    for src in page.images:
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_SIGNATURE)
    assert all(link.startswith(("#", "data:image/png")) for link in page.links)
    assert "http" not in " ".join(page.links)
    assert not page.tags & {"script", "link", "iframe", "object"}
    # strings from files are escaped
    assert HOSTILE not in text and "&lt;script&gt;" in text
    assert "suite&lt;2&gt;" in text
    # each section holds what it shows
    assert "accuracy_after" in _section(text, "summary")
    assert "<details>" in _section(text, "config") and "kl_coef" in _section(text, "config")
    assert _section(text, "curves").count("<img") >= 6  # reward, accuracy, KL, entropy, ...
    assert "generate" in _section(text, "timeline")
    evals = _section(text, "eval-suites")
    assert "pass@4" in evals and "maj@4" in evals and "truncation_rate" in evals
    assert "During training" in evals and "<img" in evals  # eval/suite1/* curves
    bias = _section(text, "bias-probes")
    assert "Q+IF+CoT" in bias and "bias_ambiguous" in bias and "<img" in bias
    assert "metrics.png" in _section(text, "plots")


def test_report_compares_runs(runs, compared, tmp_path, monkeypatch):
    text = compared.read_text()
    page = _Page(text)
    assert set(SECTION_IDS) <= set(page.ids)
    assert "notes" not in page.ids and "could not be drawn" not in text
    assert "run_a" in text and "run_b" in text
    config = _section(text, "config")
    # only the keys that differ are compared (run.dir, optim.lr), each run's YAML below
    differing = config.split("<details>")[0]
    assert "optim.lr" in differing and "run.dir" in differing
    assert "data.task" not in differing and "algo.kl_coef" not in differing
    assert config.count("<details>") == 2
    assert 'class="differs"' in _section(text, "summary")  # accuracy_after differs
    monkeypatch.chdir(tmp_path)
    assert default_report_path(runs) == tmp_path / "plait_report.html"


def test_broken_files_become_notes(tmp_path):
    run = _fake_run(tmp_path, "broken")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines.insert(2, '{"step": 2, "reward/mean": 0.')  # a corrupt line in the middle
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run / "eval_results.json").write_text("[{not json")
    (run / "bias_results.json").write_text(json.dumps({"a": 1}))
    (run / "timeline.jsonl").write_text('{"step": 1, "spans": [["generate", 0, 0.1]]}\n'
                                        '{"step": 2, "spans": "nope"}\n')
    (run / "extra.png").write_bytes(b"not a png")
    text = render_report([run])
    page = _Page(text)
    notes = _section(text, "notes")
    assert "metrics.jsonl" in notes and "line 3" in notes
    assert "eval_results.json is not valid JSON" in notes
    assert "bias_results.json" in notes and "timeline.jsonl" in notes
    assert "extra.png is not a PNG" in notes
    assert "Traceback" not in text
    assert {"summary", "curves", "timeline", "plots"} <= set(page.ids)
    assert "eval-suites" in page.ids  # the eval sets logged in metrics.jsonl still plot
    assert "bias-probes" not in page.ids
    assert _section(text, "curves").count("<img") >= 6


def test_a_run_without_results_shows_what_it_has(tmp_path):
    """A run still going (metrics only): no summary, eval, bias or timeline sections."""
    run = tmp_path / "going"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "time": 1.7e9,
                                                   "loss/sft": 2.0}) + "\n")
    text = render_report([run])
    ids = set(_Page(text).ids)
    assert {"header", "summary", "config", "curves"} <= ids
    assert not ids & {"timeline", "eval-suites", "bias-probes", "plots"}
    assert "summary.json not recorded" in text and "config.yaml not recorded" in text
    assert ">sft<" in text  # what trained, from its metrics


def test_cli_report(runs, tmp_path, capsys):
    out = tmp_path / "sub" / "page.html"
    assert main(["report", str(runs[0]), str(runs[1]), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert out.read_text().startswith("<!DOCTYPE html>")


@pytest.mark.parametrize("make", [lambda p: p.mkdir(), lambda p: None,
                                  lambda p: p.write_text("x")])
def test_cli_refuses_what_is_not_a_run(tmp_path, capsys, make):
    path = tmp_path / "not_a_run"
    make(path)
    assert main(["report", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("plait: error:") and "not_a_run" in err
    assert not (tmp_path / "not_a_run" / "report.html").exists()
    with pytest.raises(ReportError):
        render_report([path])


# --------------------------------------------------------------------------- in a browser


def _browser_paths() -> tuple[str, str]:
    """Chromium and chromedriver; skipped where missing, except on CI (which installs
    them: the page must be seen rendered there)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    missing = [name for name, path in (("chromium", chromium), ("chromedriver", driver))
               if path is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if missing:
        message = f"the browser test needs {', '.join(missing)}"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI must run it)")
        pytest.skip(message)
    return chromium, driver


@pytest.fixture
def browser():
    chromium, driver_path = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1280,1000", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # an explicit driver path: Selenium Manager (which downloads drivers) is never run
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_report_renders_in_a_browser(compared, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(compared.resolve().as_uri())
    WebDriverWait(browser, 20).until(lambda d: d.execute_script(
        "return document.readyState === 'complete' && "
        "Array.from(document.images).every(i => i.complete)"))
    for section_id in SECTION_IDS:
        element = browser.find_element(By.ID, section_id)
        assert element.is_displayed(), section_id
        assert element.size["width"] > 0 and element.size["height"] > 0, section_id
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.naturalWidth, i.naturalHeight])")
    assert len(images) == len(_Page(compared.read_text()).images) > 10
    assert all(width > 0 and height > 0 for _, width, height in images), images
    severe = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not severe, severe

    # the whole page in one screenshot: a window as tall as the document
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, height + 120)
    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot))
    data = shot.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    width, tall = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 1000 and tall >= min(height, 8000) * 0.9, (width, tall, height)
    if os.environ.get("PLAIT_REPORT_SCREENSHOT"):
        target = Path(os.environ["PLAIT_REPORT_SCREENSHOT"])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)
