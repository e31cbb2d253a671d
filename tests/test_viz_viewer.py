"""keras_attn.viz.viewer: the attention viewer, checked as a page in a real browser.

The browser tests drive Debian's headless `chromium` through `chromedriver`
(``make`` installs both with apt-get when they are missing) and skip, saying why,
only where they cannot be found.
"""

import base64
import json
import re
import shutil
import tempfile

import numpy as np
import pytest

from keras_attn import viz

TOKENS = ["The", "cat", "sat", "on", "the", "mat"]


def _weights(*shape, seed=0):
    return np.random.default_rng(seed).dirichlet(np.ones(shape[-1]), size=shape[:-1])


def _spec(viewer):
    block = re.search(
        r'<script type="application/json" class="ka-data">(.*?)</script>', viewer.html
    )
    return json.loads(block.group(1))


# -- the page, without a browser ---------------------------------------------------------


def test_page_is_one_self_contained_file(tmp_path):
    viewer = viz.attention_viewer(_weights(2, 6, 6), TOKENS, path=str(tmp_path / "v.html"))
    page = (tmp_path / "v.html").read_text(encoding="utf-8")
    assert viewer.path == str(tmp_path / "v.html") and page == viewer.html
    assert page.startswith("<!DOCTYPE html>")
    # Nothing is fetched: no external script, style, image or font.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "@import" not in page and "url(http" not in page


def test_weights_travel_exactly_as_float32():
    weights = _weights(3, 2, 6, 6)  # (B, H, Tq, Tk)
    spec = _spec(viz.attention_viewer(weights, TOKENS, example=1))
    data = np.frombuffer(base64.b64decode(spec["layers"][0]["data"]), "<f4")
    np.testing.assert_array_equal(data.reshape(2, 6, 6), weights[1].astype("float32"))
    assert spec["queryTokens"] == TOKENS and spec["keyTokens"] == TOKENS


def test_backend_tensors_are_taken_as_they_come():
    import keras

    weights = _weights(1, 2, 6, 6)
    spec = _spec(viz.attention_viewer(keras.ops.convert_to_tensor(weights, "float32")))
    data = np.frombuffer(base64.b64decode(spec["layers"][0]["data"]), "<f4")
    np.testing.assert_array_equal(data.reshape(2, 6, 6), weights[0].astype("float32"))


def test_jupyter_shows_the_fragment_with_a_fresh_root_each_time():
    viewer = viz.attention_viewer(_weights(2, 6, 6), TOKENS)
    first, second = viewer._repr_html_(), viewer._repr_html_()
    ids = [re.search(r'id="(ka-viewer-\w+)"', f).group(1) for f in (first, second)]
    assert ids[0] != ids[1] and ids[0] in first.split("</script>")[-2]
    assert "<html" not in first
    assert repr(viewer) == "<AttentionViewer text: 1 layer, heads [2], (Tq, Tk)=(6, 6)>"


def test_a_token_cannot_end_the_data_block():
    viewer = viz.attention_viewer(_weights(1, 2, 2), ["</script><b>", "&amp;"])
    assert viewer.html.count("</script>") == 2  # the data block's and the script's
    assert _spec(viewer)["queryTokens"] == ["</script><b>", "&amp;"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"weights": np.ones((2, 2, 2, 2, 2))}, r"Received: shape=\(2, 2, 2, 2, 2\)"),
        ({"tokens": ["a"]}, r"Received: len\(tokens\)=1"),
        ({"layer_names": ["a", "b"]}, r"Received: layer_names=\['a', 'b'\]"),
        ({"patch_grid": (3, 3)}, r"Received: patch_grid=\(3, 3\)"),
        ({"patch_grid": "big"}, r"Received: patch_grid='big'"),
        ({"image": np.zeros((4, 4, 2))}, r"Received: image.shape=\(4, 4, 2\)"),
        ({"weights": np.ones((1, 3, 5)), "image": np.zeros((4, 4))}, r"Tq must equal Tk"),
        ({"weights": np.ones((1, 6, 6)), "image": np.zeros((4, 4))}, r"patch grid from Tk=6"),
    ],
)
def test_bad_arguments_say_what_was_received(kwargs, message):
    kwargs = {"weights": _weights(1, 5, 5), **kwargs}
    with pytest.raises(ValueError, match=message):
        viz.attention_viewer(**kwargs)


def test_image_grid_is_inferred_around_a_cls_token():
    spec = _spec(viz.attention_viewer(_weights(1, 17, 17), image=np.zeros((8, 8, 3), "uint8")))
    assert (spec["image"]["rows"], spec["image"]["cols"]) == (4, 4)
    assert spec["keyTokens"][:2] == ["[CLS]", "patch (0, 0)"]
    assert spec["image"]["src"].startswith("data:image/png;base64,")


# -- the page in a browser ------------------------------------------------------------


def _find_browser():
    try:
        from selenium import webdriver
    except ImportError:
        return None, "selenium is not installed (pip install -e '.[tests]')"
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        return None, (
            "chromium and chromedriver are not installed: `make .venv/.installed` installs "
            "them (apt-get install chromium chromium-driver)"
        )
    return (webdriver, binary, driver), None


@pytest.fixture(scope="module")
def browser():
    found, reason = _find_browser()
    if found is None:
        pytest.skip(reason)
    webdriver, binary, driver = found
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    profile = tempfile.mkdtemp(prefix="keras-attn-chromium-")
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=1200,1400", f"--user-data-dir={profile}",
        # Any request the page made would fail, and show up as a console error.
        "--host-resolver-rules=MAP * ~NOTFOUND",
    ):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    yield chrome
    chrome.quit()
    shutil.rmtree(profile, ignore_errors=True)


class Page:
    """One loaded viewer page and the moves a user makes on it."""

    def __init__(self, browser, path):
        from selenium.webdriver.common.by import By

        self.browser, self.by = browser, By
        browser.get(f"file://{path}")
        browser.get_log("browser")  # from here on, the log holds only this page's messages
        self.root = browser.find_element(By.CSS_SELECTOR, ".ka-viewer")

    def all(self, css):
        return self.root.find_elements(self.by.CSS_SELECTOR, css)

    def hover(self, element):
        from selenium.webdriver.common.action_chains import ActionChains

        self.browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
        ActionChains(self.browser).move_to_element(element).perform()

    def rest(self):
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.support.wait import WebDriverWait

        control = self.all("select.ka-layer")[0]
        ActionChains(self.browser).move_to_element(control).perform()
        WebDriverWait(self.browser, 5).until(lambda _: self.root.get_attribute("data-focus") == "")

    def choose(self, what, value):
        from selenium.webdriver.support.select import Select

        Select(self.all(f"select.ka-{what}")[0]).select_by_value(str(value))

    def shown(self, css):
        """The weights shown on the elements `css`, by their data-index."""
        nodes = sorted(self.all(css), key=lambda n: int(n.get_attribute("data-index")))
        return np.array([float(n.get_attribute("data-weight")) for n in nodes], "float32")

    def lines(self):
        """The text view's lines: ``{(query, key): opacity}``."""
        script = """return Array.from(arguments[0].querySelectorAll('line')).map(
            l => [+l.dataset.q, +l.dataset.k, +l.getAttribute('stroke-opacity')]);"""
        rows = self.browser.execute_script(script, self.root)
        return {(q, k): np.float32(w) for q, k, w in rows}

    def errors(self):
        return [e for e in self.browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]


def _model_weights(num_heads, length, seed, **kwargs):
    """Weights ``(1, H, T, T)`` of a real keras_attn layer on random inputs."""
    import keras

    import keras_attn

    layer = keras_attn.Attention(num_heads=num_heads, key_dim=4, seed=seed, **kwargs)
    x = np.random.default_rng(seed).normal(size=(1, length, 8)).astype("float32")
    _, scores = layer(x, return_attention_scores=True)
    return keras.ops.convert_to_numpy(scores).astype("float32")


@pytest.fixture(scope="module")
def text_page(browser, tmp_path_factory):
    weights = {
        "block_0": _model_weights(2, len(TOKENS), seed=1),
        "block_1": _model_weights(3, len(TOKENS), seed=2, pattern="causal"),
    }
    path = tmp_path_factory.mktemp("viewer") / "text.html"
    viz.attention_viewer(weights, TOKENS, path=str(path))
    return Page(browser, path), {name: w[0] for name, w in weights.items()}


def test_text_page_loads_without_console_errors(text_page):
    page, _ = text_page
    labels = [n.text for n in page.all(".ka-keys .ka-token .ka-label")]
    assert labels == TOKENS
    assert [o.text for o in page.all("select.ka-layer option")] == ["block_0", "block_1"]
    assert [o.text for o in page.all("select.ka-head option")] == ["head 0", "head 1"]
    assert page.errors() == []


def test_choosing_a_head_redraws_the_lines_with_its_weights(text_page):
    page, weights = text_page
    page.rest()
    drawn = {}
    for head in (0, 1):
        page.choose("head", head)
        drawn[head] = page.lines()
        expected = weights["block_0"][head]
        assert drawn[head], "no line drawn"
        for (q, k), opacity in drawn[head].items():
            assert opacity == expected[q, k]
        strong = set(zip(*np.nonzero(expected >= 0.01), strict=True))
        assert strong <= set(drawn[head])
    assert drawn[0] != drawn[1]
    assert page.errors() == []


def test_hovering_a_token_shows_the_models_weights(text_page):
    page, weights = text_page
    page.choose("layer", 1)  # 3 heads there: the head menu follows the layer
    assert len(page.all("select.ka-head option")) == 3
    page.choose("head", 2)
    page.hover(page.all(".ka-queries .ka-token")[3])
    assert page.root.get_attribute("data-focus") == "query 3"
    np.testing.assert_array_equal(page.shown(".ka-keys .ka-token"), weights["block_1"][2, 3])
    assert page.shown(".ka-keys .ka-token")[4:].sum() == 0  # causal: "the", "mat" unseen
    readout = page.all(".ka-readout")[0].text
    assert readout.startswith('"on" (3) attends to:')
    page.hover(page.all(".ka-keys .ka-token")[1])  # a key: who attends to "cat"
    np.testing.assert_array_equal(page.shown(".ka-queries .ka-token"), weights["block_1"][2, :, 1])
    page.rest()
    assert page.all("[data-weight]") == []
    assert page.errors() == []


def test_image_page_tints_the_patches_a_patch_attends_to(browser, tmp_path):
    rows, cols, length = 3, 4, 1 + 3 * 4  # [CLS] and a 3x4 grid of patches
    weights = _model_weights(2, length, seed=3)
    image = np.random.default_rng(0).integers(0, 256, size=(24, 32, 3), dtype="uint8")
    path = tmp_path / "vit.html"
    viz.attention_viewer(weights, image=image, patch_grid=(rows, cols), path=str(path))
    page = Page(browser, path)
    assert len(page.all(".ka-patch")) == rows * cols
    assert [n.text for n in page.all(".ka-extras .ka-token .ka-label")] == ["[CLS]"]

    def received():
        return np.array(
            [float(n.get_attribute("data-received")) for n in page.all(".ka-patch")], "float32"
        )

    at_rest = {}
    for head in (0, 1):
        page.choose("head", head)
        at_rest[head] = received()
        np.testing.assert_allclose(at_rest[head], weights[0, head].mean(0)[1:], rtol=1e-5)
    assert not np.array_equal(at_rest[0], at_rest[1])

    patch = 1 + 2 * cols + 1  # row 2, column 1
    page.hover(page.all(".ka-patch")[patch - 1])
    keys = ".ka-patch, .ka-extras .ka-token"
    np.testing.assert_array_equal(page.shown(keys), weights[0, 1, patch])
    page.hover(page.all(".ka-extras .ka-token")[0])  # what [CLS] attends to
    np.testing.assert_array_equal(page.shown(keys), weights[0, 1, 0])
    assert page.errors() == []


def test_two_viewers_in_one_notebook_do_not_touch_each_other(browser, tmp_path):
    first = viz.attention_viewer(_weights(2, 3, 3, seed=0), list("abc"))
    second = viz.attention_viewer(_weights(2, 3, 3, seed=1), list("xyz"))
    path = tmp_path / "notebook.html"
    path.write_text(
        f"<!DOCTYPE html><html><body>{first._repr_html_()}{second._repr_html_()}</body></html>",
        encoding="utf-8",
    )
    page = Page(browser, path)
    roots = page.browser.find_elements(page.by.CSS_SELECTOR, ".ka-viewer")
    assert len(roots) == 2
    page.root = roots[1]
    page.hover(page.all(".ka-queries .ka-token")[0])
    assert roots[0].get_attribute("data-focus") == ""
    assert roots[1].get_attribute("data-focus") == "query 0"
    np.testing.assert_array_equal(
        page.shown(".ka-keys .ka-token"), _weights(2, 3, 3, seed=1)[0, 0].astype("float32")
    )
    assert page.errors() == []
