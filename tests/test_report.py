"""posttrain report: the page a person opens — every plot present and decodable, two runs overlaid, samples before
and after, and in headless Chromium a page that renders with every image loaded."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess

import pytest

from conftest import GSM8K
from helpers import metrics, run_sft

GSM8K_TEST = GSM8K.parent / "gsm8k_test_200.jsonl"


@pytest.fixture(scope="module")
def two_runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    evals = (f"[{{task: perplexity, data: {GSM8K_TEST}, limit: 6, max_length: 384}}, "
             f"{{task: answer_accuracy, data: {GSM8K_TEST}, limit: 2, max_new_tokens: 6}}]")
    for name, lr in (("fast", 1e-2), ("slow", 1e-3)):
        run_sft(tiny_model_dir, root / name, **{"train.lr": lr, "train.max_steps": 6, "train.eval_every": 3,
                                                 "evals": evals, "train.precision": "fp32"})
    return [root / "fast", root / "slow"]


def images(page: str) -> list[bytes]:
    return [base64.b64decode(src) for src in re.findall(r"src='data:image/png;base64,([^']+)'", page)]


def test_report_overlays_runs_with_every_plot_and_sample(two_runs, tmp_path):
    from posttrain.apps.cli import main

    out = tmp_path / "report.html"
    assert main(["report", *map(str, two_runs), "--out", str(out)]) == 0
    page = out.read_text()
    pngs = images(page)
    assert pngs and all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in pngs)
    assert len(re.findall(r"<img ", page)) == len(pngs)  # nothing refers to a file that is not inlined
    for title in ("training loss", "learning rate", "gradient norm", "tokens / s", "peak memory (GB)",
                  "eval/perplexity/loss", "eval/answer_accuracy/accuracy"):
        assert f"alt='{title}'" in page
    assert "eval/perplexity/loss_low" not in re.findall(r"alt='([^']+)'", page)  # intervals are bands, not plots
    summary = page[page.index("<h2>Summary</h2>"):page.index("<h2>Training</h2>")]
    assert summary.count("<td>fast</td>") == 1 and summary.count("<td>slow</td>") == 1 and "<td>sft</td>" in summary
    assert "Generations before / after" in page and "step 0" in page and "step 6" in page
    assert len([r for r in metrics(two_runs[0], "samples.jsonl")]) == 3 * 2  # 3 evaluations x 2 questions


def test_report_renders_in_headless_chromium(two_runs, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium (make test installs the Debian package where it may)")
    from posttrain.apps.report import write_report

    page = write_report([str(d) for d in two_runs], str(tmp_path / "report.html"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,1600"]
    shot = tmp_path / "shot.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120,
                   check=True)
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[0] > 1000 and pixels.std() > 0.05  # not a blank page
    assert (pixels.min(-1) < 0.5).mean() > 0.005  # text and curves drawn in dark ink
    # every image loaded: count the broken ones in the browser itself
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", "<script>document.title = 'broken=' + [...document.images]"
                                              ".filter(i => !i.complete || i.naturalWidth === 0).length + ' of ' + "
                                              "document.images.length;</script></body>"))
    dom = subprocess.run([browser, *flags, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    found = re.search(r"<title>broken=(\d+) of (\d+)</title>", dom)
    assert found, dom[:500]
    assert found.group(1) == "0" and int(found.group(2)) == len(images(page.read_text()))


def test_watch_rewrites_the_page_when_a_run_logs(two_runs, tmp_path, monkeypatch):
    import shutil as sh

    from posttrain.apps import report

    run = tmp_path / "live"
    sh.copytree(two_runs[0], run)
    out = tmp_path / "live.html"
    ticks = iter(range(3))

    def sleep(_):
        tick = next(ticks, None)
        if tick == 0:
            with open(run / "metrics.jsonl", "a") as f:
                f.write('{"step": 7, "loss": 0.123456, "lr": 0.0, "grad_norm": 1.0, "tokens": 1, "elapsed_s": 1.0}\n')
        elif tick is None or tick == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(report.time, "sleep", sleep)
    with pytest.raises(KeyboardInterrupt):
        report.watch([str(run)], str(out), interval=2)
    page = out.read_text()
    assert "<meta http-equiv='refresh' content='2'>" in page and "-&gt; 0.1235" in page
