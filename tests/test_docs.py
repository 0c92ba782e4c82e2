"""The README stays short and points at docs/ that exist; every results table is the one the JSON gives."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(rel: str) -> str:
    with open(os.path.join(ROOT, rel)) as fh:
        return fh.read()


def test_readme_is_short_and_its_links_resolve():
    readme = _read("README.md")
    assert len(readme.splitlines()) <= 200
    links = re.findall(r"\]\(([^)#]+)\)", readme)
    assert "docs/results.md" in links
    for rel in links:
        assert os.path.exists(os.path.join(ROOT, rel)), rel
    for name in ("quantization", "pipeline", "kernels", "large-models", "behaviour", "results"):
        assert f"docs/{name}.md" in links


def test_generated_tables_match_the_results_json():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "tables.py"), "--check"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for rel in ("README.md", os.path.join("docs", "results.md")):
        text = _read(rel)
        # every block holds a table: a generator that printed nothing would leave an empty block
        for body in re.findall(r"<!-- table: [\w-]+ -->\n(.*?)<!-- /table -->", text, re.S):
            assert body.strip().startswith("|"), (rel, body[:80])
