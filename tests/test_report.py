"""The terminal table and the self-contained HTML report page."""
import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

from user_dist.evaluation.metrics import METRIC_KEYS, evaluate
from user_dist.evaluation.report import example_queries, format_table, render_html, top_k, write_report


def toy_split(n=8, seed=0):
    """A half-trained (n, 5n) matrix with captions naming their image."""
    rng = np.random.default_rng(seed)
    sims = rng.standard_normal((n, 5 * n)).astype(np.float32) * 0.2
    for i in range(n):
        sims[i, 5 * i:5 * i + 5] += 0.4
    captions = [f"caption {c} of image {j // 5}" for j, c in zip(range(5 * n), [0, 1, 2, 3, 4] * n)]
    return sims, captions, [f"img{k:03d}" for k in range(n)]


def section(page, title):
    """The HTML between the heading `title` and the next heading."""
    return page.split(title, 1)[1].split("<h2>", 1)[0]


def test_table_has_a_row_per_protocol_and_every_metric():
    sims, _, _ = toy_split()
    text = format_table({"generic": evaluate(sims, "generic"), "other": evaluate(sims, "generic")})
    header, rule, *rows = text.splitlines()
    assert header.split() == ["protocol", *METRIC_KEYS]
    assert [r.split()[0] for r in rows] == ["generic", "other"]
    assert rows[0].split()[METRIC_KEYS.index("rsum") + 1] == f"{evaluate(sims, 'generic')['rsum']:.2f}"


def test_top_k_is_the_head_of_a_full_descending_sort():
    scores = np.random.default_rng(1).standard_normal(100)
    assert top_k(scores).tolist() == np.argsort(-scores)[:5].tolist()


def test_examples_are_evenly_spread_and_the_same_every_time():
    assert example_queries(5, 1000).tolist() == [0, 250, 500, 749, 999]
    assert example_queries(5, 3).tolist() == [0, 1, 2]


def test_image_queries_list_their_top5_captions_with_the_correct_ones_marked():
    sims, captions, labels = toy_split()
    page = render_html("t", {"generic": evaluate(sims, "generic")}, sims, captions, labels, examples=3)
    rows = section(page, "Image to text").split("<tr>")[1:]
    assert len(rows) == 3
    for k, row in zip(example_queries(3, 8), rows):
        assert labels[k] in row
        cells = re.findall(r'<td class="(ok|no)">(.*?)</td>', row, flags=re.S)
        want = top_k(sims[k])
        assert [c[1].split("<br>")[0].replace("&#10003; ", "") for c in cells] == [captions[j] for j in want]
        assert [c[0] for c in cells] == ["ok" if j // 5 == k else "no" for j in want]
        assert row.count("&#10003;") == sum(j // 5 == k for j in want)


def test_caption_queries_list_their_top5_images_with_the_correct_one_marked():
    sims, captions, labels = toy_split()
    page = render_html("t", {"generic": evaluate(sims, "generic")}, sims, captions, labels, examples=4)
    rows = section(page, "Text to image").split("<tr>")[1:]
    assert len(rows) == 4
    for j, row in zip(example_queries(4, 40), rows):
        cells = re.findall(r'<td class="(ok|no)">(.*?)</td>', row, flags=re.S)
        want = top_k(sims[:, j])
        assert [re.search(r"img\d{3}", c[1]).group(0) for c in cells] == [labels[k] for k in want]
        assert [c[0] for c in cells] == ["ok" if k == j // 5 else "no" for k in want]


def test_pictures_are_embedded_as_jpeg_data_and_missing_ones_are_counted():
    from user_dist.evaluation.report import shown_images
    from user_dist.evaluation.thumbnails import ReportImages, jpeg_data_uri

    sims, captions, labels = toy_split(n=8)
    pixels = np.random.default_rng(2).integers(0, 255, size=(200, 300, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    shown = shown_images([sims], 1)
    images = ReportImages("pics/test", {k: jpeg_data_uri(buf.getvalue()) for k in shown[1:]})  # the first has none
    page = render_html("t", {}, sims, captions, labels, images, examples=1)
    uris = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page)
    assert uris and len(set(uris)) == 1
    img = Image.open(io.BytesIO(base64.b64decode(uris[0])))
    assert img.format == "JPEG" and img.size == (112, 75)  # shrunk to 112 px a side, aspect kept
    assert f"1 of the {len(shown)} images shown have no picture there" in page and "pics/test" in page
    assert labels[shown[0]] in page.split("<table>", 2)[2]  # the one without a picture: label and caption


def test_page_is_self_contained_escaped_and_has_both_recall_curves(tmp_path):
    sims, captions, labels = toy_split()
    captions[0] = "<script>alert(1)</script> & co"
    path = tmp_path / "report.html"
    write_report(str(path), "step 10", {"generic": evaluate(sims, "generic")}, sims, captions, labels)
    page = path.read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in page
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from elsewhere
    svg = section(page, "Recall@K")
    assert svg.count("<polyline") == 2 and "image to text" in svg and "text to image" in svg
    assert list(tmp_path.iterdir()) == [path]  # written atomically: no temp file left


def test_captions_that_do_not_match_the_matrix_are_refused():
    sims, captions, labels = toy_split()
    with pytest.raises(ValueError, match="39 captions and 8 image labels.*expected 40 and 8"):
        render_html("t", {}, sims, captions[:-1], labels)


def test_ranks_handed_in_give_the_same_page_as_ranks_counted_here():
    """The evaluation job passes the ranks it counted on the device; they are used, not recounted."""
    import torch

    from user_dist.evaluation.metrics import i2t_ranks_torch, t2i_ranks_torch

    sims, captions, labels = toy_split()
    t = torch.from_numpy(sims)
    ranks = (i2t_ranks_torch(t).numpy(), t2i_ranks_torch(t).numpy())
    results = {"generic": evaluate(sims, "generic")}
    page = render_html("t", results, sims, captions, labels)
    assert render_html("t", results, sims, captions, labels, ranks=ranks) == page
    perfect = (np.zeros_like(ranks[0]), np.zeros_like(ranks[1]))
    assert render_html("t", results, sims, captions, labels, ranks=perfect) != page
