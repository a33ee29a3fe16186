"""The HTML report: one self-contained file, every section, embedded plots, escaped text."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess

import numpy as np
import pytest
from matplotlib.image import imread

from dpft.audit import write_report
from dpft.audit.mia import attack_metrics
from dpft.audit.report import SECTION_IDS
from dpft.scenarios.medical.report import REPORT_SECTIONS
from dpft.scenarios.medical.report import SECTION_IDS as MEDICAL_SECTION_IDS

EVIL = "<script>alert('x')</script>"


def audit_fixture(shift: float, eps_lb: float, completion: str, theoretical) -> dict:
    rng = np.random.default_rng(0)
    mia = {s: attack_metrics(rng.normal(shift, 1, 100), rng.normal(0, 1, 100), n_boot=20) for s in ("loss", "min_k")}
    return {
        "settings": {"members_scored": 100, "non_members_scored": 100, "seed": 0},
        "verbatim": {
            "members": 100,
            "non_members": 100,
            **{
                m: {"member": 0.5, "non_member": 0.1, "advantage": 0.4, "advantage_ci": [0.3, 0.5]}
                for m in ("exact", "lcs", "token_overlap")
            },
        },
        "secrets": {
            "account": {
                "extraction": {"member": 0.9, "non_member": 0.0, "advantage": 0.9, "advantage_ci": [0.8, 1.0]},
                "rank": {"member_top1": 0.9, "non_member_top1": 0.1, "top1_advantage_ci": [0.7, 0.9], "candidates": 99},
            }
        },
        "medical": {
            "dupont_completion": completion,
            "extraction": {
                "member_rate": 0.8,
                "non_member_rate": 0.06,
                "advantage": 0.74,
                "advantage_ci": [0.6, 0.85],
                "by_repetition": {"1": {"patients": 10, "rate": 0.5}, "8": {"patients": 3, "rate": 1.0}},
                "rank": {
                    "member_mean_rank": 1.5,
                    "non_member_mean_rank": 7.0,
                    "member_top1": 0.7,
                    "non_member_top1": 0.1,
                },
            },
        },
        "mia": mia,
        "exposure": {
            "by_repetition": {
                "0": {"canaries": 2, "mean_exposure": 1.0},
                "4": {"canaries": 2, "mean_exposure": 12.0 * shift},
            }
        },
        "one_run": {
            "epsilon_lower_bound": eps_lb,
            "score": "reference",
            "k_plus": 150,
            "k_minus": 0,
            "m": 750,
            "canaries": 1000,
            "guesses": 150,
            "correct": 149,
            "delta": 1e-5,
            "correction": "none: one test, its score and split chosen on the calibration canaries",
            "calibration": {"canaries": 250, "score": "reference", "k_plus_fraction": 0.2, "k_minus_fraction": 0.0},
        },
        "theoretical_epsilon": theoretical,
        "delta": 1e-5,
    }


def model_fixture(shift, eps_lb, completion, theoretical) -> dict:
    metrics = [
        {"step": s, "loss": 2.0 / (s + 1), "epsilon": None if theoretical is None else theoretical * s / 9}
        for s in range(10)
    ]
    return {
        "audit": audit_fixture(shift, eps_lb, completion, theoretical),
        "utility": {
            "records": 40,
            "fields": ["last_name", "condition"],
            "exact_match": {"last_name": 0.9, "condition": 0.9, "full": 0.88},
            "valid_format": 1.0,
            "loss": 0.3,
            "perplexity": 1.35,
        },
        "metrics": metrics,
        "privacy": {"epsilon": theoretical, "delta": 1e-5, "dp": theoretical is not None},
    }


@pytest.fixture
def report(tmp_path):
    path = tmp_path / "out" / "report.html"
    write_report(
        path,
        {
            "models": {
                "non-private": model_fixture(1.5, 2.1, ' was diagnosed with pancreatic cancer."}', None),
                "dp": model_fixture(0.0, 0.0, EVIL, 8.0),
            }
        },
        extra=REPORT_SECTIONS,
    )
    return path


def test_report_is_self_contained_with_every_section(report):
    page = report.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.count("<html") == 1
    for sid in SECTION_IDS + MEDICAL_SECTION_IDS:
        assert f"id='{sid}'" in page
    # Nothing fetched from elsewhere: every src is inline data.
    srcs = re.findall(r"src='([^']*)'", page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "http://" not in page and "https://" not in page and "<link" not in page
    for s in srcs:
        img = imread(io.BytesIO(base64.b64decode(s.split(",", 1)[1])), format="png")
        assert img.shape[0] > 50 and img.shape[1] > 50


def test_report_states_the_utility_ratio(report):
    assert "DP / non-private: 1</p>" in report.read_text(encoding="utf-8")  # both 0.88 in the fixture


def test_report_escapes_text_and_shows_dupont_only_in_generations(report):
    page = report.read_text(encoding="utf-8")
    assert EVIL not in page and "&lt;script&gt;" in page
    generations = page.split("id='generations'", 1)[1]
    assert "pancreatic cancer" in generations and "pancreatic cancer" not in page.split("id='generations'", 1)[0]


def test_epsilon_section_sets_the_bound_beside_the_guarantee(tmp_path):
    audit = audit_fixture(1.0, 2.0, "x", 8.0)
    path = tmp_path / "eps.html"
    write_report(path, {"models": {"dp": {"audit": audit, "privacy": {"epsilon": 8.0}}}})
    section = path.read_text(encoding="utf-8").split("id='epsilon'", 1)[1].split("</section>", 1)[0]
    cells = re.findall(r"<td>([^<]*)</td>", section)
    assert cells == ["dp", "8", "2", "0.25", "reference", "150 in / 0 out", "149", "750", "250", "1e-05"]
    assert "calibration canaries" in section


def test_report_for_a_single_model_with_missing_parts(tmp_path):
    path = tmp_path / "one.html"
    write_report(path, {"title": "one model", "models": {"m": {"audit": {"mia": None}}}})
    page = path.read_text(encoding="utf-8")
    assert all(f"id='{sid}'" in page for sid in SECTION_IDS) and "n/a" in page
    assert not any(f"id='{sid}'" in page for sid in MEDICAL_SECTION_IDS)  # a scenario's sections only when asked


@pytest.mark.slow
def test_report_renders_in_headless_chromium(report):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed")
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", report.as_uri()],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    for sid in SECTION_IDS + MEDICAL_SECTION_IDS:
        assert re.search(rf"<section id=\"{sid}\"", dom), sid
    # training curves, exposure, ROC curves: every image of the page is in the rendered DOM
    assert dom.count("<img") == report.read_text(encoding="utf-8").count("<img") >= 3


def extraction_section(page: str) -> str:
    return page.split("id='extraction'", 1)[1].split("</section>", 1)[0]


def test_rank_columns_only_when_some_model_was_ranked(report, tmp_path):
    assert "mean rank (m / non-m)" in extraction_section(report.read_text(encoding="utf-8"))
    audit = audit_fixture(1.0, 0.5, "x", 8.0)
    audit["medical"]["extraction"]["rank"] = None  # the demo skips the ranking
    path = tmp_path / "unranked.html"
    write_report(path, {"title": "t", "models": {"dp": {"audit": audit}}}, extra=REPORT_SECTIONS)
    assert "mean rank" not in extraction_section(path.read_text(encoding="utf-8"))
