"""`clipdense review`: the HTML report of a ShapeWorld run labelled on S3, its structure, its orders,
the fine-tune section, and the page opened in a real (headless) browser."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import shutil
import tarfile
import uuid
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml
from jobs_fixtures import (
    corrupt_image,
    job_config,
    local_ray,  # noqa: F401 - module fixture
    read_labels,
    read_rows,
    replace_image,
    shapes,
    tiny_model,
)
from PIL import Image

from jobs.cli import main
from pipeline.distribute import run_label_job
from pipeline.io import fs
from pipeline.io.read import Sample, iter_samples
from pipeline.review import write_report
from pipeline.review.finetune import open_finetune
from pipeline.review.overlay import font_size, overlay, thumbnail, tint
from pipeline.review.report import JPEG_QUALITY
from pipeline.review.run import iter_shown, open_run, select

CHROMIUM = "/usr/bin/chromium"
N = 6


@dataclass
class Run:
    url: str  # the run's output on the loopback S3
    options: dict
    rows: list[dict]  # every Parquet row, shard by shard
    root: Path  # local scratch folder of the module


@pytest.fixture(scope="module")
def run(tmp_path_factory, s3, local_ray) -> Run:  # noqa: F811
    """Two ShapeWorld shards on S3 (12 scenes, one 60x150, two corrupt) and a shard that is no tar,
    labelled onto S3 with the zoom grid on."""
    root = tmp_path_factory.mktemp("review")
    urls = shapes(str(root / "in"), 2, 6)
    replace_image(urls[0], "000000_000002", (60, 150))
    corrupt_image(urls[1], "000001_000001")
    corrupt_image(urls[1], "000001_000004")
    options = dict(s3.storage_options)
    prefix = f"{s3.url}/review-{uuid.uuid4().hex[:8]}"
    filesystem, path = fs.url_to_fs(prefix, options)
    filesystem.put(str(root / "in") + "/", f"{path}/in/", recursive=True)
    filesystem.pipe(f"{path}/broken/shapes-000009.tar", b"not a tar archive" * 64)
    cfg = job_config(
        [f"{prefix}/in", f"{prefix}/broken/shapes-000009.tar"],
        f"{prefix}/out",
        tiny_model(root / "tiny-clip"),
        "zoom.enabled=true",
        "zoom.grid=2",
        "distribute.max_retries=0",
        storage_options=options,
    )
    summary = run_label_job(cfg)
    assert (summary["shards"]["committed"], summary["shards"]["failed"]) == (2, 1)
    rows = [row for shard in ("shapes-000000", "shapes-000001") for row in read_rows(cfg.output, shard, options)]
    return Run(cfg.output, options, rows, root)


@pytest.fixture(scope="module")
def report(run) -> Path:
    """The report of `run`, lowest confidence first, written to a local folder."""
    out = run.root / "report"
    assert write_report(run.url, str(out), n=N, storage_options=run.options) == str(out / "index.html")
    return out


class _Page(HTMLParser):
    """Cards and teacher/student pairs (their data-* attributes), every src/href, and the page's text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.cards: list[dict[str, str]] = []
        self.pairs: list[dict[str, str]] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "article" and a.get("class") in ("card", "pair"):
            (self.cards if a["class"] == "card" else self.pairs).append(a)
        if tag == "img":
            self.images.append(a["src"])
        if tag == "a":
            self.links.append(a["href"])

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.size


def test_the_report_of_a_run_on_s3_shows_the_lowest_confidence_samples_with_every_file_present(run, report):
    parsed = _Page((report / "index.html").read_text())
    ok = [r for r in run.rows if r["status"] == "ok"]
    lowest = sorted(ok, key=lambda r: r["mean_confidence"])[:N]
    assert [c["data-key"] for c in parsed.cards] == [r["key"] for r in lowest]
    shown = [float(c["data-confidence"]) for c in parsed.cards]
    assert shown == sorted(shown) and max(shown) <= min(r["mean_confidence"] for r in ok if r not in lowest) + 1e-6
    # Every referenced file exists, and nothing else was written: the report grows with N, not the run.
    referenced = set(parsed.images) | set(parsed.links)
    assert all((report / name).is_file() for name in referenced)
    written = {str(p.relative_to(report)) for p in report.rglob("*") if p.is_file()}
    assert written == referenced | {"index.html"}
    assert len(written) == 1 + 3 + 6 * N  # page, 3 plots, 3 thumbnails + 3 full-size pictures per card
    again = run.root / "smaller"  # a second, smaller report into the same folder leaves no stale pictures
    shutil.copytree(report, again)
    write_report(run.url, str(again), n=2, sort="highest-confidence", storage_options=run.options)
    parsed_again = _Page((again / "index.html").read_text())
    kept = {str(p.relative_to(again)) for p in again.rglob("*") if p.is_file()}
    assert kept == set(parsed_again.images) | set(parsed_again.links) | {"index.html"} and len(kept) == 1 + 3 + 6 * 2
    by_key = {r["key"]: r for r in ok}
    for number, card in enumerate(parsed.cards):
        row = by_key[card["data-key"]]
        full, thumb = f"full/{number:04d}", f"thumbs/{number:04d}"
        assert _size(report / f"{full}.image.jpg") == (row["width"], row["height"])
        assert _size(report / f"{full}.confidence.jpg") == (row["width"], row["height"])
        width, height = _size(report / f"{full}.overlay.jpg")  # the image and its legend panel
        assert width > row["width"] and height >= row["height"]
        assert max(_size(report / f"{thumb}.image.jpg")) <= 256
        assert _size(report / f"{thumb}.overlay.jpg") == _size(report / f"{thumb}.image.jpg")
        shares = json.loads(card["data-shares"])
        assert sum(shares.values()) == pytest.approx(1 - row["ignored_fraction"], abs=1e-4)
    text = " ".join(parsed.text)
    assert all(f"{len(by_key[c['data-key']]['zoom_regions'])} zoom regions" in text for c in parsed.cards)
    assert all(by_key[c["data-key"]]["zoom_regions"] for c in parsed.cards)  # zoom.grid=2: drawn on every overlay
    assert "2 failed samples in committed shards" in text and "jpg: not a readable image" in text
    assert "shapes-000001/000001_000001, shapes-000001/000001_000004" in text
    assert "Shards that failed as a whole:" in text and "shapes-000009" in text


def _rename_sample(shard: str, key: str, new: bytes) -> None:
    """Give sample `key` of the local tar `shard` the raw name bytes `new` (pax, as the bytes are)."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape") as tar:
        for member, content in members:
            if member.name.startswith(f"{key}."):
                member.name = new.decode("utf-8", "surrogateescape") + member.name[len(key) :]
            tar.addfile(member, io.BytesIO(content))


def test_a_sample_whose_key_is_not_utf8_is_shown(tmp_path, local_ray, caplog):  # noqa: F811
    """A Latin-1 key is stored as escaped text plus its bytes (`key_bytes`); the report finds its
    image and maps by the key the reader gives (surrogate escapes), and shows it under the text."""
    [shard] = shapes(str(tmp_path / "in"), 1, 3)
    _rename_sample(shard, "000000_000001", b"caf\xe9")
    cfg = job_config(shard, str(tmp_path / "out"), tiny_model(tmp_path / "tiny-clip"))
    assert run_label_job(cfg)["samples"]["ok"] == 3
    data = open_run(cfg.output)
    chosen = select(data.rows, 3, "lowest-confidence", data.vocab)
    with caplog.at_level(logging.WARNING, logger="pipeline.review.run"):
        shown = list(iter_shown(data, chosen))
    assert sorted(s.row["key"] for s in shown) == ["000000_000000", "000000_000002", "caf\\xe9"]
    assert not [r for r in caplog.records if "could not be read" in r.getMessage()]
    latin1 = next(s for s in shown if s.row["key"] == "caf\\xe9")
    with tarfile.open(shard, encoding="utf-8", errors="surrogateescape") as tar:
        stored = np.asarray(Image.open(tar.extractfile("caf\udce9.jpg")).convert("RGB"))
    assert np.array_equal(latin1.image, stored) and latin1.labels.shape == stored.shape[:2]
    out = tmp_path / "report"
    write_report(cfg.output, str(out), n=3)
    assert sorted(c["data-key"] for c in _Page((out / "index.html").read_text()).cards) == [
        "000000_000000",
        "000000_000002",
        "caf\\xe9",
    ]


def test_orders_choose_the_right_samples(run):
    data = open_run(run.url, run.options)
    ok = [i for i, r in enumerate(run.rows) if r["status"] == "ok"]
    confidence = {i: run.rows[i]["mean_confidence"] for i in ok}
    highest = select(data.rows, 3, "highest-confidence", data.vocab)
    assert [confidence[i] for i in highest] == sorted(confidence.values(), reverse=True)[:3]
    picked = select(data.rows, 4, "random", data.vocab, seed=1)
    assert (
        len(set(picked)) == 4
        and set(picked) <= set(ok)
        and picked == select(data.rows, 4, "random", data.vocab, seed=1)
    )
    name = data.vocab.display_names[run.rows[ok[0]]["class_ids"][-1]]
    cls = data.vocab.display_names.index(name)

    def share(i: int) -> float:
        row = run.rows[i]
        pixels = dict(zip(row["class_ids"], row["class_pixels"], strict=True))
        return pixels.get(cls, 0) / (row["width"] * row["height"])

    chosen = select(data.rows, 100, f"class:{name.upper()}", data.vocab)
    assert sorted(chosen) == [i for i in ok if share(i) > 0]
    assert [share(i) for i in chosen] == sorted((share(i) for i in chosen), reverse=True)


def test_the_cli_writes_beside_the_run_on_s3_and_refuses_bad_orders(run, s3, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint_url)  # how a user points s3fs at their store
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    assert main(["review", run.url, "--n", "2", "--sort", "random"]) == 0
    index = f"{run.url}/review/index.html"
    assert capsys.readouterr().out.strip() == f"report: {index}"
    assert len(_Page(fs.read_text(index, run.options)).cards) == 2
    for args, reason in [(["--sort", "class:unicorn"], "no class 'unicorn'"), (["--sort", "best"], "unknown order")]:
        assert main(["review", run.url, *args]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not moto's log
        assert len(errors) == 1 and errors[0].startswith("clipdense review: error: --sort") and reason in errors[0]
    assert main(["review", str(run.root / "nothing-here")]) == 2
    assert "not a labeling run's output" in capsys.readouterr().err


def test_the_cli_reaches_the_store_from_an_override_or_the_label_config(run, s3, tmp_path, capsys):
    assert "AWS_ENDPOINT_URL" not in os.environ  # the endpoint comes from the command line only
    endpoint = f"storage_options.endpoint_url={s3.endpoint_url}"
    assert main(["review", run.url, "--n", "2", "--out", str(tmp_path / "a"), endpoint]) == 0
    assert len(_Page((tmp_path / "a/index.html").read_text()).cards) == 2
    (tmp_path / "label.yaml").write_text(
        f"input: [{run.url}/in]\nstorage_options: {{endpoint_url: '{s3.endpoint_url}'}}\n"
    )
    assert (
        main(["review", run.url, "--n", "1", "--out", str(tmp_path / "b"), "--config", str(tmp_path / "label.yaml")])
        == 0
    )
    assert len(_Page((tmp_path / "b/index.html").read_text()).cards) == 1
    capsys.readouterr()
    assert main(["review", run.url, "infer.short_side=448"]) == 2
    assert capsys.readouterr().err.strip() == (
        "clipdense review: error: override 'infer.short_side=448': review takes storage_options.KEY=VALUE overrides only"
    )


def test_a_local_finetune_of_a_run_on_s3_is_reviewed_with_its_recorded_endpoint(run, s3, tmp_path):
    ft = tmp_path / "ft"
    (ft / "_run").mkdir(parents=True)
    (ft / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "loss": 1.0}) + "\n")
    # As the fine-tune writes it: the endpoint is kept, the credentials are not (they come from AWS_*).
    (ft / "_run/config.yaml").write_text(
        f"labels: [{run.url}]\nstorage_options: {{endpoint_url: '{s3.endpoint_url}'}}\n"
    )
    assert "AWS_ENDPOINT_URL" not in os.environ
    assert main(["review", str(ft), "--n", "2", "--out", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report/index.html").read_text()
    assert len(_Page(page).cards) == 2 and f"Fine-tune {ft} on {run.url}" in page


def test_the_review_of_a_finetune_shows_the_label_run_asked_for(run, tmp_path, capsys):
    """A fine-tune of two label runs: the first by default, the second with --label-run 2, none past them."""
    second = job_config(shapes(str(tmp_path / "in"), 1, 3), str(tmp_path / "second"), tiny_model(tmp_path / "m"))
    assert run_label_job(second)["shards"]["committed"] == 1
    ft = tmp_path / "ft"
    (ft / "_run").mkdir(parents=True)
    (ft / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "loss": 1.0}) + "\n")
    (ft / "_run/config.yaml").write_text(yaml.safe_dump({"labels": [run.url, second.output]}))
    options = ["--n", "6", "--compare", "0", *(f"storage_options.{k}={v}" for k, v in run.options.items())]
    for number, cards in ((1, N), (2, 3)):
        out = tmp_path / f"report-{number}"
        assert main(["review", str(ft), "--label-run", str(number), "--out", str(out), *options]) == 0
        page = (out / "index.html").read_text()
        assert len(_Page(page).cards) == cards and f"The gallery shows label run {number} of 2" in page
    assert main(["review", str(ft), "--label-run", "3", *options]) == 2
    assert "--label-run 3: the fine-tune has 2 label runs (1..2)" in capsys.readouterr().err


def test_finetune_metrics_are_read_by_kind_and_a_line_cut_mid_write_is_skipped(tmp_path):
    lines = [{"kind": "train", "step": s, "loss": 2.0 / s, "lr": 1e-3, "img_per_s": 10.0} for s in range(1, 21)]
    lines += [{"kind": "eval", "step": 10, "mIoU": 0.1}, {"kind": "eval", "step": 20, "mIoU": 0.25}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + '\n{"kind": "tra')
    (tmp_path / "_run").mkdir()
    (tmp_path / "_run/config.yaml").write_text(f"labels: [{tmp_path / 'labels'}]\noutput: {tmp_path}\n")
    parsed = open_finetune(str(tmp_path))
    assert parsed.series("eval", "mIoU") == ([10.0, 20.0], [0.1, 0.25])
    assert parsed.series("train", "loss") == ([float(s) for s in range(1, 21)], [2.0 / s for s in range(1, 21)])
    assert parsed.labels == [str(tmp_path / "labels")] and parsed.model is None and parsed.summary is None


@pytest.mark.slow
def test_a_finetune_adds_its_curves_and_its_student_beside_the_teacher(run, tmp_path):
    from finetune_fixtures import FINETUNE_FAST

    from pipeline.config import load_config
    from pipeline.stages.infer import DenseLabeler
    from pipeline.train import finetune
    from pipeline.train.config import FinetuneCfg

    ft = tmp_path / "ft"
    short = ["optim.steps=2", "eval.every=1", "eval.max_images=2", f"eval.truth={run.root / 'in'}"]
    # The run's one-block tiny CLIP is too shallow for a DenseCLIP student: start from the shipped model.
    cfg = load_config(None, [*FINETUNE_FAST, *short, "model.name=shapes-clip"], cls=FinetuneCfg)
    summary = finetune(dataclasses.replace(cfg, labels=[run.url], output=str(ft), storage_options=run.options))
    out = tmp_path / "report"
    write_report(str(ft), str(out), n=3, compare=2, storage_options=run.options)

    page = (out / "index.html").read_text()
    assert f"Fine-tune {ft} on {run.url}" in page and f"&quot;final_step&quot;: {summary['final_step']}" in page
    parsed = _Page(page)
    assert {"plots/finetune-loss.svg", "plots/finetune-miou.svg"} <= set(parsed.images)
    pairs = parsed.pairs
    assert "Teacher against student on 2 images" in page
    assert [p["data-key"] for p in pairs] == [c["data-key"] for c in parsed.cards[:2]]
    # The student's pictures are its labels as `clipdense label model.name=OUT/model` makes them.
    data = open_run(run.url, run.options)
    student = DenseLabeler(load_config(None, [f"model.name={ft / 'model'}", "infer.batch_size=4"]), data.vocab)
    shards = [str(run.root / f"in/shapes-00000{i}.tar") for i in range(2)]
    images = {s.key: s.image for url in shards for s in iter_samples(url) if isinstance(s, Sample)}
    for number, card in enumerate(parsed.cards[:2]):
        image = images[card["data-key"]]
        labels = student([image])[0].labels
        buf = io.BytesIO()
        Image.fromarray(thumbnail(tint(image, labels, len(data.vocab), data.ignore), 256)).save(
            buf, format="JPEG", quality=JPEG_QUALITY
        )
        shown = (out / f"thumbs/{number:04d}.student.jpg").read_bytes()
        assert shown == buf.getvalue()
        shard = next(r["shard"] for r in run.rows if r["key"] == card["data-key"])
        seg = read_labels(run.url, shard, run.options)[f"{card['data-key']}.seg.png"]
        teacher_labels = np.asarray(Image.open(io.BytesIO(seg)))
        scored = teacher_labels != data.ignore
        assert float(pairs[number]["data-agreement"]) == pytest.approx(
            (labels == teacher_labels)[scored].mean(), abs=1e-6
        )
        learnt, teacher = (
            np.asarray(Image.open(out / f"thumbs/{number:04d}.{p}.jpg"), np.int16) for p in ("student", "overlay")
        )
        assert np.abs(learnt - teacher).mean() > 3  # two steps from the shipped model: not its tiny teacher


def test_overlay_legend_text_scales_with_the_image():
    names = ["background", "red circle", "blue square"]
    small, large = (np.full((h, h, 3), 128, np.uint8) for h in (96, 2048))
    labels = {h: np.repeat(np.arange(3, dtype=np.uint8), -(-h // 3))[:h][None].repeat(h, 0) for h in (96, 2048)}
    pictures = {h: overlay(img, labels[h], names, 255) for h, img in ((96, small), (2048, large))}
    assert font_size(2048) == round(2048 / 24) and font_size(96) == 12  # never below 12 px
    panel = {h: pictures[h].size[0] - h for h in pictures}
    assert panel[2048] > 4 * panel[96]  # the legend grows with the picture instead of staying a few pixels


def _browser():
    """Playwright's Chromium driver on Debian's browser; a failure under CI, else a skip."""
    reason = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "playwright is not installed"
    if reason is None and not os.path.exists(CHROMIUM):
        reason = f"no browser at {CHROMIUM} (apt-get install chromium)"
    if reason is None:
        return sync_playwright
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


# Chromium with no network at all: no DNS, no proxy reachable, no background services.
NO_NETWORK = [
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--proxy-server=http://127.0.0.1:9",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-domain-reliability",
    "--disable-sync",
    "--no-pings",
    "--no-first-run",
]


@pytest.mark.slow
def test_the_page_loads_every_picture_and_sorts_and_filters_in_a_real_browser(report, tmp_path):
    sync_playwright = _browser()
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=NO_NETWORK)
        try:
            context = browser.new_context(offline=True, viewport={"width": 1600, "height": 1000})
            context.on("request", lambda r: requests.append(r.url))
            page = context.new_page()
            page.goto((report / "index.html").as_uri(), wait_until="load")
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => [e.getAttribute('src'), e.complete, e.naturalWidth])"
            )
            assert images and all(complete and width > 0 for _, complete, width in images), images
            sizes = page.eval_on_selector_all(
                ".card",
                "cs => cs.map(c => Array.from(c.querySelectorAll('img')).map(i => [i.naturalWidth, i.naturalHeight]))",
            )
            assert len(sizes) == N
            assert all(image == overlay for image, overlay, _ in sizes)  # each overlay matches its image
            assert page.inner_text("#shown") == str(N)

            page.select_option("#sort", "highest-confidence")
            shown = page.eval_on_selector_all(".card", "cs => cs.map(c => +c.dataset.confidence)")
            assert shown == sorted(shown, reverse=True)
            shares = page.eval_on_selector_all(".card", "cs => cs.map(c => JSON.parse(c.dataset.shares))")
            rare = min({n for s in shares for n in s}, key=lambda n: sum(n in s for s in shares))
            page.select_option("#class", rare)
            visible = page.eval_on_selector_all(".card:not([hidden])", "cs => cs.map(c => c.dataset.key)")
            assert len(visible) == sum(rare in s for s in shares) == int(page.inner_text("#shown"))
            page.select_option("#class", "")
            middle = sorted(shown)[N // 2]
            page.fill("#min-confidence", f"{middle:.6f}")
            visible = page.eval_on_selector_all(".card:not([hidden])", "cs => cs.map(c => +c.dataset.confidence)")
            assert sorted(visible) == sorted(c for c in shown if c >= float(f"{middle:.6f}"))
            page.screenshot(path=str(tmp_path / "review.png"), full_page=True)
        finally:
            browser.close()
    assert all(url.startswith("file://") for url in requests), requests
    assert _size(tmp_path / "review.png")[0] == 1600
