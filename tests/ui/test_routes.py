"""The page's routes on the serve app (ui/routes.py): its files open, the runs routes behind the
API key, refusals as API errors, nothing fetched from elsewhere."""

from __future__ import annotations

import pytest
from test_runs import example_runs

KEY = "sk-ui-test"


@pytest.fixture
def client(tmp_path):
    from starlette.testclient import TestClient

    from lorakit.serve.app import create_app
    from lorakit.ui.routes import OPEN_PATHS, page_routes

    routes = page_routes(example_runs(tmp_path))
    app = create_app(None, api_key=KEY, extend=routes, open_paths=OPEN_PATHS)
    with TestClient(app) as client:
        yield client


def test_page_files_are_open_and_data_needs_the_key(client):
    page = client.get("/ui/")
    assert page.status_code == 200 and "<canvas" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/ui/ui.js").headers["content-type"].startswith("text/javascript")
    for path in ("/ui/api/info", "/ui/api/runs", "/ui/api/run?path=done", "/v1/models"):
        answer = client.get(path)
        assert answer.status_code == 401, path
        assert "API key" in answer.json()["error"]["message"]
    assert client.get("/ui/secret.py").status_code == 401  # not a page file: behind the key
    auth = {"Authorization": f"Bearer {KEY}"}
    assert client.get("/ui/secret.py", headers=auth).status_code == 404  # only the page's files


def test_routes_answer_with_the_key(client):
    auth = {"Authorization": f"Bearer {KEY}"}
    info = client.get("/ui/api/info", headers=auth).json()
    assert (info["runs"], info["model"]) == (True, None)
    paths = [e["path"] for e in client.get("/ui/api/runs", headers=auth).json()["runs"]]
    assert sorted(paths) == ["done", "group/live", "killed", "old", "ranks"]
    rows = client.get("/ui/api/metrics?path=done&after=3", headers=auth).json()["rows"]
    assert [r["step"] for r in rows] == [3, 4, 4]  # rows 4-6 of t1 t2 e2 t3 t4 e4
    escape = client.get("/ui/api/run?path=../outside", headers=auth)
    assert escape.status_code == 400 and "not allowed" in escape.json()["error"]["message"]
    bad = client.get("/ui/api/metrics?path=done&after=-1", headers=auth)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "after"
    missing = client.get("/ui/api/run", headers=auth)
    assert missing.status_code == 400 and "`path` is missing" in missing.json()["error"]["message"]
    no_model = client.post("/v1/chat/completions", headers=auth, json={})
    assert no_model.status_code == 404 and "--model" in no_model.json()["error"]["message"]


def test_the_page_fetches_nothing_from_elsewhere():
    """Offline machines: no URL of another host in the page's files, and every file listed."""
    import re

    from lorakit.ui.routes import PAGE, PAGE_FILES

    assert sorted(PAGE_FILES) == sorted(p.name for p in PAGE.iterdir())
    for name in PAGE_FILES:
        text = (PAGE / name).read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), name
        assert not re.search(r"\b(import|@import)\s*\(?\s*['\"]https?", text), name


def test_ui_serves_an_adapter_given_as_a_bare_path(tmp_path, monkeypatch, capsys):
    """`lorakit ui --model M --adapter ./out`: the adapter is named after its folder."""
    import uvicorn
    from starlette.testclient import TestClient

    from lorakit.ui.routes import ui_main
    from serve_support import make_adapters, make_model, make_tokenizer

    make_model().save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "model")
    folders = make_adapters(tmp_path, ["tuned"])
    served = []

    def run(app, **options):  # instead of listening: ask the app what it serves
        with TestClient(app) as client:
            auth = {"Authorization": f"Bearer {KEY}"}
            served.extend(m["id"] for m in client.get("/v1/models", headers=auth).json()["data"])

    monkeypatch.setattr(uvicorn, "run", run)
    ui_main(model=str(tmp_path / "model"), adapters=[str(folders["tuned"])], api_key=KEY, threads=1)
    assert served == [str(tmp_path / "model"), "tuned"]
    assert "web page: http://127.0.0.1:7860/ui/" in capsys.readouterr().out
