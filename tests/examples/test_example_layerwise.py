"""A short run of the layer-wise pruning example: it writes its plot and its table."""

from __future__ import annotations

from examples import layerwise_sls

COLUMNS = [
    "seed",
    "embedding",
    "kept blocks",
    "dropped",
    "full (%)",
    "truncated, not retrained (%)",
    "truncated + retrained (%)",
    "change (points)",
    "full + same retraining (%)",
]


def _table_rows(text: str, header_start: str) -> tuple[list[str], list[list[str]]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return header, rows


def test_example_writes_plot_and_table(tmp_path):
    outcomes = layerwise_sls.main([
        "--seeds", "0", "--embeddings", "pca", "--blocks", "3", "--width", "8",
        "--pretrain-epochs", "1", "--adapt-epochs", "1", "--retrain-epochs", "1",
        "--out", str(tmp_path), "--quiet",
    ])
    plot = tmp_path / "layerwise_sls.png"
    table = tmp_path / "layerwise_sls.md"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = table.read_text()

    header, rows = _table_rows(text, "| seed | embedding | kept")
    assert header == COLUMNS
    assert [row[:2] for row in rows] == [["0", "pca"], ["mean", "pca"]]
    (outcome,) = outcomes
    assert rows[0][2] == f"{outcome.depth} of 3"
    assert 1 <= outcome.depth <= 3
    assert rows[0][3] == f"{round(100 * (3 - outcome.depth) / 3)}%"

    scores_header, score_rows = _table_rows(text, "| seed | embedding | block 1")
    assert scores_header == ["seed", "embedding", "block 1", "block 2", "block 3", "threshold"]
    assert len(score_rows) == 1
    assert float(score_rows[0][-1]) == round(0.9 * outcome.scores[-1], 3)
