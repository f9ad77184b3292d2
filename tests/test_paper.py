"""make paper: every section, the picture on top, no placeholder left, missing numbers fail."""

import json
import re
import shutil

import pytest

from conftest import ROOT, TINY_RES, run_cli
from search import bench, engines
from search.engines.objective import HeadObjective
from search.errors import UserError
from search.final import FinalConfig, build_final
from search.paper import render, write_paper
from search.report import write_report
from search.train import PooledData

SECTIONS = ["Abstract", "Introduction", "Materials and Methods", "Results", "Discussion", "Acknowledgments",
            "Literature Cited", "Appendices"]


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory, tiny_splits, tiny_npz, tiny_cache, spec):
    """A whole tiny pipeline: final, search, report, benches (random weights, 32 px)."""
    tmp = tmp_path_factory.mktemp("pipeline")
    results = tmp / "results"
    build_final(FinalConfig(weights=None, resolution=TINY_RES, cache_root=str(tmp / "cache"), results=str(results),
                            output=str(tmp / "cifar10.h5"), head_epochs=2, tail_epochs=1, tail_batch_size=32,
                            bn_passes=1, parity_images=10, progress=False), tiny_splits)
    engines.make_engine("optuna", progress=False, results=results).run(
        HeadObjective(PooledData.from_cache(tiny_cache, tiny_splits), "tiny", max_epochs=2), 4)
    write_report(results / "report", results)
    bench.bench_cache(spec, tiny_splits, None, TINY_RES, None, 60, results, compare_allocators=False)
    import keras

    keras.utils.set_random_seed(0)
    model = spec.build(weights=None, size=TINY_RES)
    bench.bench_search(tiny_cache, tiny_splits, spec, model, 3, 2, 0, 20, results, weights=None, full_max_epochs=2)
    out = run_cli("evaluate", "--model", str(tmp / "cifar10.h5"), "--data", str(tiny_npz), "--results", str(results))
    assert out.returncode == 0, out.stderr[-2000:]
    docs = tmp / "docs"
    docs.mkdir()
    shutil.copy(ROOT / "docs" / "paper_template.md", docs / "paper_template.md")
    return results, docs, tiny_npz


def test_paper_sections_picture_and_no_placeholders(tiny_results):
    results, docs, npz = tiny_results
    path = write_paper(results, docs, str(npz))
    text = path.read_text()
    first = text.lstrip().splitlines()[0]
    assert first.startswith("![") and "figures/predictions.png" in first
    headings = re.findall(r"^## (.+)$", text, re.M)
    assert headings == SECTIONS
    assert "{{" not in text and "}}" not in text
    final = json.loads((results / "final.json").read_text())
    assert f"{100 * final['test_accuracy']:.2f} %" in text
    page = (docs / "paper.html").read_text()
    assert page.count("data:image/png;base64,") >= 5 and 'src="figures/' not in page
    assert re.search(r"<body><p><img", page), "the top element of the HTML is the picture"


def test_missing_number_fails(tiny_results):
    with pytest.raises(UserError, match="missing from results"):
        render("accuracy {{ final.test_accuracy | pct }}", {})
    results, docs, npz = tiny_results
    (results / "bench_search.json").rename(results / "bench_search.json.bak")
    try:
        with pytest.raises(UserError, match="bench_search"):
            write_paper(results, docs, str(npz))
    finally:
        (results / "bench_search.json.bak").rename(results / "bench_search.json")
