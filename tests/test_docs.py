"""The README and docs/ pages: short README, links that resolve, no issue references, figures copied from
the files that commands wrote (the demo table, the bench table)."""

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def prose(path: Path) -> str:
    """The page without its fenced code blocks (tables of examples may number rows as "#3")."""
    return FENCE.sub("", path.read_text())


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 220


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces to hyphens."""
    return {re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            for m in re.finditer(r"^#+ (.+)$", prose(path), re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_points_to_an_existing_file(page):
    for target in LINK.findall(prose(page)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):
            continue  # a URL
        name, _, anchor = target.partition("#")
        path = (page.parent / name).resolve() if name else page
        assert path.exists(), f"{page.relative_to(REPO)} links to {target}, which does not exist"
        if anchor and path.suffix == ".md":
            assert anchor in anchors(path), f"{page.relative_to(REPO)} links to {target}: no such heading"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_issue_references(page):
    found = re.findall(r"(?<![\w/&])#\d+\b", prose(page))
    assert not found, f"{page.relative_to(REPO)}: {found}"


def test_readme_demo_table_is_the_file_the_demo_wrote():
    table = (REPO / "docs" / "demo_table.txt").read_text().strip("\n")
    assert table in README.read_text()


def test_performance_page_holds_the_bench_table_of_results_json():
    from defectscope.benchmarks import report

    page = (REPO / "docs" / "performance.md").read_text()
    assert report.PAGE == REPO / "docs" / "performance.md"
    assert page.count(report.START) == 1 and page.count(report.END) == 1
    block = page.split(report.START, 1)[1].split(report.END, 1)[0]
    table = report.markdown(json.loads((REPO / "benchmarks" / "results.json").read_text()))
    assert block == "\n" + table


def test_update_page_replaces_only_the_bench_block(tmp_path):
    from defectscope.benchmarks import report

    page = tmp_path / "performance.md"
    page.write_text(f"before\n{report.START}\nold\n{report.END}\nafter\n")
    assert report.update_page("new\n", page)
    assert page.read_text() == f"before\n{report.START}\nnew\n{report.END}\nafter\n"
    (tmp_path / "none.md").write_text("no markers\n")
    assert not report.update_page("new\n", tmp_path / "none.md")


def test_the_bundled_models_figures_are_of_the_bundled_files():
    """Every evaluation a bundled model's card says it was scored by (``commands.evaluate``, in
    docs/eval/<version>/) exists and names, by sha256, the file in model/zoo (a model file changed after its
    evaluation would leave the docs quoting another model), and so does every other evaluation file in that
    version's folder."""
    import hashlib

    for name in ("defectscope-3class", "defectscope-2class"):
        zoo = REPO / "model" / "zoo" / f"{name}.onnx"
        card = json.loads(zoo.with_suffix(".card.json").read_text())
        outputs = [REPO / c.split("--out ")[1].split()[0] for c in card["commands"]["evaluate"]]
        assert len(outputs) >= 5 and all(out.is_file() for out in outputs), outputs
        folder = REPO / "docs" / "eval" / card["version"]
        assert all(out.parent == folder for out in outputs), outputs
        for path in sorted(folder.glob(f"{name.split('-')[1]}-*.json")):
            model = json.loads(path.read_text())["model"]
            assert model["name"] == name and model["sha256"] == hashlib.sha256(zoo.read_bytes()).hexdigest(), path.name
