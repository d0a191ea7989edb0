"""`cvzoo index build / search` on a folder of image files."""

from __future__ import annotations

import json

import pytest
from torchvision.utils import save_image

from cvzoo.cli import main
from cvzoo.data import Digits

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    digits = Digits("test", image_size=32, channels=3)
    for i in range(12):
        sub = root / str(int(digits.labels[i]))
        sub.mkdir(exist_ok=True)
        save_image(digits.images[i], sub / f"{i}.png")
    return root


def test_build_then_search_finds_the_query_itself_first(folder, tmp_path, capsys):
    index = tmp_path / "index"
    assert main(["index", "build", str(folder), "--out", str(index), "-m", "resnet_micro_classifier",
                 "--size", "32"]) == 0
    assert "indexed 12 images" in capsys.readouterr().out
    assert json.loads((index / "embedder.json").read_text())["model"] == "resnet_micro_classifier"
    queries = sorted(folder.rglob("*.png"))[:3]
    assert main(["index", "search", *map(str, queries), "--index", str(index), "-k", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for q in queries:  # each query block: the query, then 4 ranked hits, the first the query's own file
        at = lines.index(str(q))
        hits = lines[at + 1:at + 5]
        assert len(hits) == 4 and hits[0].split()[1] == str(q)
        assert float(hits[0].split()[2]) == pytest.approx(1.0, abs=1e-4)  # cosine similarity with itself


def test_run_embedder_and_other_backends(folder, tmp_path):
    from cvzoo.image_index import build_index, search_index

    pytest.importorskip("faiss")
    run = tmp_path / "run"
    assert main(["train", "-m", "resnet_micro_classifier", "-d", "digits", "--steps", "1", "--batch-size", "8",
                 "--no-progress", "--out", str(run)]) == 0
    build_index(folder, tmp_path / "faiss", {"run": str(run)}, size=32, backend="faiss-flat", metric="l2")
    query = sorted(folder.rglob("*.png"))[5]
    hits = search_index(tmp_path / "faiss", [query], k=2)[0]
    assert hits[0] == (str(query), pytest.approx(0.0, abs=1e-3))  # squared distance to itself


def test_errors(folder, tmp_path, capsys):
    assert main(["index", "build", str(folder), "--out", str(tmp_path / "x")]) == 2
    assert "exactly one of --run" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["index", "build", str(tmp_path / "empty"), "--out", str(tmp_path / "x"), "-m",
                 "resnet_micro_classifier"]) == 2
    assert "holds no images" in capsys.readouterr().err
    assert main(["index", "search", str(next(folder.rglob("*.png"))), "--index", str(tmp_path)]) == 2
    assert "cvzoo index build" in capsys.readouterr().err
    assert main(["index", "build", str(folder), "--out", str(tmp_path / "x"), "-m", "resnet_micro_fpn"]) == 2
    assert "no (B, D) embedding" in capsys.readouterr().err
