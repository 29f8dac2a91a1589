"""The web console in a real browser: Playwright driving the system's headless Chromium against a live app.

The service has API keys (made in its gallery store before it starts), so the console asks for one first.
Every flow a person would try: open the service's address, give the key, recognise a two-person photo and find
both boxes where the API puts them, name an Unknown face and see the next recognition name it, look at the people
with their chips, remove them, compare two photos, read the status, send a file that is not a photo, give a wrong
key and then the right one, use a recognition-only key (no People), and use it all at phone width. No console
error and no failed request, except the refusals meant to happen. With ``FACEREC_SCREENSHOTS=DIR``
(``make screenshots``) each screen is saved.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from serve_app.access.keys import KeyRing
from serve_app.gallery_store import open_gallery_store
from tests.serve_fixtures import ServeCluster
from tests.waiting import wait_until

from .conftest import LFW, SCENES

pytestmark = [pytest.mark.serve, pytest.mark.browser]

APP = "console"
CHROMIUM = os.environ.get("FACEREC_CHROMIUM", "/usr/bin/chromium")
#: What the platform notes say a headless Chromium needs here: no sandbox as root, and none of the background
#: connections that a closed network refuses.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = os.environ.get("FACEREC_SCREENSHOTS")


#: The console's keys: one that may do everything, one for recognition only (set by the ``console`` fixture).
KEYS: dict[str, str] = {}


@pytest.fixture(scope="module")
def console(serve_cluster: ServeCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from ray import serve

    from serve_app.app import AppArgs, build_app

    gallery = tmp_path_factory.mktemp("gallery")
    ring = KeyRing(open_gallery_store(str(gallery)))
    KEYS["admin"] = ring.create("console admin", ["manage", "recognize"])[0]
    KEYS["booth"] = ring.create("photo booth", ["recognize"])[0]
    args = {"gallery_uri": str(gallery), "recognizer": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 1.0}}
    serve.run(build_app(AppArgs.model_validate(args)), name=APP, route_prefix="/", blocking=False)
    url = serve_cluster.url
    wait_until(lambda: _healthy(url), 240, "the console's application did not become healthy")
    yield url
    serve.delete(APP)


def admin() -> dict[str, str]:
    return {"X-API-Key": KEYS["admin"]}


def _healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/healthz", timeout=5).status_code == 200
    except requests.ConnectionError:
        return False


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).is_file():
        pytest.fail(f"no Chromium at {CHROMIUM}: `make browser` installs it (or set FACEREC_CHROMIUM)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Watched:
    """A page with every console error, failed request and error response it met."""

    def __init__(self, browser: Any, **context: Any) -> None:
        self.context = browser.new_context(**context)
        self.page = self.context.new_page()
        self.problems: list[str] = []

        def console_message(message: Any) -> None:
            if message.type == "error":
                self.problems.append(f"console: {message.text}")

        def response(answer: Any) -> None:
            if answer.status >= 400:
                self.problems.append(f"{answer.status}: {answer.request.method} {answer.url}")

        self.page.on("console", console_message)
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("requestfailed", lambda r: self.problems.append(f"failed: {r.method} {r.url} {r.failure}"))
        self.page.on("response", response)
        self.page.on("dialog", lambda dialog: dialog.accept())  # the remove confirmations

    def shot(self, name: str) -> None:
        if not SHOTS:
            return
        from PIL import Image

        target = Path(SHOTS) / f"{name}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(target))
        # A 256-colour palette: a README picture of a page, a fifth of the bytes of a full-colour one.
        with Image.open(target) as shot:
            quantized = shot.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
        quantized.save(target, optimize=True)

    def close(self) -> None:
        self.context.close()


def _api_boxes(url: str, photo: Path) -> list[list[float]]:
    answer = requests.post(
        f"{url}/v1/recognize", files={"image": (photo.name, photo.read_bytes())}, headers=admin(), timeout=120
    )
    return [face["box"] for face in answer.json()["faces"]]


def _enter_key(page: Any, key: str) -> None:
    dialog = page.locator("#key-dialog")
    dialog.wait_for(state="visible", timeout=30_000)
    page.fill("#key-input", key)
    page.click("#key-form button[type=submit]")


def test_recognise_name_an_unknown_face_see_it_named_and_remove_it(console: str, chromium: Any) -> None:
    watched = Watched(chromium, viewport={"width": 1000, "height": 1000})
    page = watched.page
    page.goto(f"{console}/")  # a browser's Accept: text/html is sent to the console
    assert page.url == f"{console}/ui/"
    _enter_key(page, KEYS["admin"])  # asked for at once: this service has keys
    page.wait_for_selector("body[data-ready='key'][data-scope='manage']")

    couple = SCENES / "couple.jpg"
    page.set_input_files("#recognise-files", str(couple))
    faces = page.locator(".result .face")
    faces.nth(1).wait_for(timeout=120_000)
    assert faces.count() == 2
    assert [faces.nth(i).get_attribute("data-name") for i in range(2)] == ["Unknown", "Unknown"]
    # Both boxes where the API puts them, in the displayed photo's pixels.
    image = page.locator(".result .photo img").bounding_box()
    natural = page.eval_on_selector(".result .photo img", "i => [i.naturalWidth, i.naturalHeight]")
    scale = image["width"] / natural[0]
    expected = sorted(_api_boxes(console, couple))
    shown = sorted(
        [
            [(b["x"] - image["x"]) / scale, (b["y"] - image["y"]) / scale]
            for b in (faces.nth(i).bounding_box() for i in range(2))
        ]
    )
    for (x, y), box in zip(shown, expected, strict=True):
        assert abs(x - box[0]) < 3 / scale + 2 and abs(y - box[1]) < 3 / scale + 2, (shown, expected)
    assert page.locator(".result .meta").inner_text().startswith("2 faces · model ")
    watched.shot("recognise")

    # Name the first face: the photo is recognised again with the name.
    faces.nth(0).click()
    page.fill(".details input[name=name]", "Partner One")
    page.click(".details button[type=submit]")
    page.wait_for_selector(".result .face[data-name='Partner One']", timeout=120_000)
    assert page.locator(".result .face[data-name='Unknown']").count() == 1
    # And the other one: two people enrolled from the page, both named in the group photo.
    page.locator(".result .face[data-name='Unknown']").click()
    page.fill(".details input[name=name]", "Partner Two")
    page.click(".details button[type=submit]")  # the key is already known to this tab
    page.wait_for_selector(".result .face[data-name='Partner Two']", timeout=120_000)
    assert sorted(faces.nth(i).get_attribute("data-name") or "" for i in range(2)) == ["Partner One", "Partner Two"]
    assert requests.delete(f"{console}/v1/people/Partner Two", headers=admin(), timeout=60).ok
    page.set_input_files("#recognise-files", str(couple))  # recognised again, now with one of them
    page.locator(".result").nth(1).wait_for()
    page.wait_for_function("() => document.querySelectorAll('.result')[0].querySelectorAll('.face').length === 2")
    page.locator(".result").first.locator(".face[data-name='Partner One']").click()
    chip = page.locator(".details .candidates img").first
    chip.wait_for()
    loaded = "i => i.complete && i.naturalWidth === 160"
    page.wait_for_function(f"() => [...document.querySelectorAll('.details .candidates img')].every({loaded})")
    watched.shot("recognise-named")

    # People: the new person with the chip of the face that was enrolled; then removed.
    page.click("nav a[data-screen=people]")
    card = page.locator("article.person[aria-label='Partner One']")
    card.wait_for()
    assert "Partner One (1)" in card.inner_text()
    page.wait_for_function("() => document.querySelector('article.person img.chip')?.naturalWidth === 160")
    assert page.locator("#people-count").inner_text() == "1 person, 1 face"
    watched.shot("people")
    card.locator("h3 button").click()
    page.wait_for_selector("article.person", state="detached")
    assert page.locator("#people-count").inner_text() == "0 people, 0 faces"
    assert requests.get(f"{console}/v1/people", headers=admin(), timeout=30).json()["people"] == []

    # Verify and Status.
    page.click("nav a[data-screen=verify]")
    sorkin = LFW / "images" / "Aaron_Sorkin"
    page.set_input_files("#verify-1", str(sorkin / "Aaron_Sorkin_0001.jpg"))
    page.set_input_files("#verify-2", str(sorkin / "Aaron_Sorkin_0002.jpg"))
    page.click("#verify-form button[type=submit]")
    page.wait_for_selector("#verify-outcome.ok", timeout=120_000)
    assert page.locator("#verify-outcome").inner_text().startswith("The same person")
    watched.shot("verify")
    page.click("nav a[data-screen=status]")
    page.wait_for_selector("#status-list dd")
    status = page.locator("#status-list").inner_text()
    assert "Recognizer replicas ready" in status and "facenet" in status and "required on every route" in status
    watched.shot("status")
    assert watched.problems == []

    # A file that is not a photo: the API's own message, and that refusal is the only failed request.
    page.click("nav a[data-screen=recognise]")
    page.set_input_files(
        "#recognise-files", files=[{"name": "notes.jpg", "mimeType": "image/jpeg", "buffer": b"not a photo at all"}]
    )
    refusal = page.locator(".result .error").first
    refusal.wait_for(timeout=60_000)
    expected_message = requests.post(
        f"{console}/v1/recognize", files={"image": ("notes.jpg", b"not a photo at all")}, headers=admin(), timeout=60
    ).json()["error"]["message"]
    assert expected_message in refusal.inner_text()
    assert all("415" in problem for problem in watched.problems) and watched.problems
    watched.close()


def test_a_wrong_api_key_is_refused_and_asked_for_again(console: str, chromium: Any) -> None:
    watched = Watched(chromium)
    page = watched.page
    page.goto(f"{console}/ui/#people")
    _enter_key(page, "not-the-key")
    page.wait_for_selector("#key-error:has-text('refused')")  # asked again, saying why
    _enter_key(page, KEYS["admin"])
    page.wait_for_selector("body[data-ready='key'][data-scope='manage']")
    photo = SCENES / "knn" / "train" / "biden" / "biden.jpg"
    page.fill("#enrol-name", "biden")
    page.set_input_files("#enrol-files", str(photo))
    page.click("#enrol-form button[type=submit]")
    page.wait_for_selector("#enrol-outcome.ok", timeout=120_000)
    assert page.locator("#enrol-outcome").inner_text() == "Enrolled 1 face of biden."
    assert [p["name"] for p in requests.get(f"{console}/v1/people", headers=admin(), timeout=30).json()["people"]] == [
        "biden"
    ]
    # A photo of two faces cannot say whose name it is: refused, with the reason.
    page.fill("#enrol-name", "pair")
    page.set_input_files("#enrol-files", str(SCENES / "couple.jpg"))
    page.click("#enrol-form button[type=submit]")
    page.wait_for_selector("#enrol-outcome.error", timeout=120_000)
    assert "couple.jpg: 2 faces found" in page.locator("#enrol-outcome").inner_text()
    assert [p for p in watched.problems if "401" not in p and "422" not in p] == []
    requests.delete(f"{console}/v1/people/biden", headers=admin(), timeout=60).raise_for_status()
    watched.close()


def test_a_recognition_only_key_sees_no_people(console: str, chromium: Any) -> None:
    assert requests.post(
        f"{console}/v1/people/obama/faces",
        files=[("images", ("obama.jpg", (SCENES / "knn" / "train" / "obama" / "obama.jpg").read_bytes()))],
        headers=admin(),
        timeout=120,
    ).ok
    watched = Watched(chromium)
    page = watched.page
    page.goto(f"{console}/ui/#people")
    _enter_key(page, KEYS["booth"])
    page.wait_for_selector("body[data-ready='key'][data-scope='recognize']")
    assert page.locator("nav a[data-screen=people]").is_hidden() and page.locator("#people").is_hidden()
    page.set_input_files("#recognise-files", str(SCENES / "knn" / "test" / "obama1.jpg"))
    page.locator(".result .face[data-name='obama']").first.wait_for(timeout=120_000)
    page.locator(".result .face").first.click()
    page.wait_for_selector(".details .candidates li")
    assert page.locator(".details .candidates img").count() == 0  # chips are the gallery's: not for this key
    page.click("nav a[data-screen=status]")
    page.wait_for_selector("#status-list dd")
    assert "photo booth (recognize)" in page.locator("#status-list").inner_text()
    assert watched.problems == []  # what this key may see is known from the status: nothing refused
    requests.delete(f"{console}/v1/people/obama", headers=admin(), timeout=60).raise_for_status()
    watched.close()


def test_the_console_works_at_phone_width_and_from_the_keyboard(console: str, chromium: Any) -> None:
    watched = Watched(chromium, viewport={"width": 375, "height": 800}, is_mobile=True, has_touch=True)
    page = watched.page
    page.goto(f"{console}/ui/")
    _enter_key(page, KEYS["admin"])
    page.wait_for_selector("body[data-ready]")
    page.set_input_files("#recognise-files", str(SCENES / "knn" / "test" / "obama1.jpg"))
    page.locator(".result .face").first.wait_for(timeout=120_000)
    for screen in ("recognise", "people", "verify", "status"):
        page.click(f"nav a[data-screen={screen}]")
        page.wait_for_timeout(300)
        width = page.evaluate("() => document.scrollingElement.scrollWidth")
        assert width <= 375, f"{screen} overflows the phone's width: {width}px"
    watched.shot("phone-status")
    # Every control can be reached with Tab and has a name a screen reader can say.
    unnamed = page.evaluate(
        """() => [...document.querySelectorAll('input, button, a')].filter(e => e.offsetParent !== null)
            .filter(e => !(e.labels?.length || e.getAttribute('aria-label') || e.textContent.trim()))
            .map(e => e.outerHTML)"""
    )
    assert unnamed == []
    page.click("nav a[data-screen=recognise]")
    # Focused and pressed in one step, as a keyboard user does (a separate focus() then a page-level key press
    # can lose the focus in between to the page's own asynchronous rendering).
    page.locator(".result .face").first.press("Enter")
    page.wait_for_selector(".details h4")
    assert watched.problems == []
    watched.close()
