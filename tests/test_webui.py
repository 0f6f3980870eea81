"""The web UI in a real browser (headless Chromium driven by Playwright) on the tiny model."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DOCS = Path(__file__).parent.parent / "docs"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (installed by .ci/run)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ids = tmp_path_factory.mktemp("webui") / "identities"
    port = free_port()
    log = open(ids.parent / "server.log", "w")
    env = {**os.environ, "CELEBBASIS_CACHE": str(ids.parent / "cache"), "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "-m", "celebbasis.cli", "webui", "--tiny", "-o", str(ids), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError((ids.parent / "server.log").read_text())
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("web UI did not start")
    yield url, ids
    os.kill(proc.pid, signal.SIGTERM)  # our own server, by its PID
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
    said = (ids.parent / "server.log").read_text()
    assert proc.returncode == 143 and "Keyboard interruption" not in said, said[-500:]  # SIGTERM: our exit, no Gradio notice


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        pg = browser.new_page(viewport={"width": 1280, "height": 1000})
        pg.goto(server[0])
        pg.wait_for_selector("#learn-photo")
        yield pg
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = Path(os.environ.get("CELEBBASIS_TEST_ARTIFACTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as the kernel writes them) with a socket listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.rsplit(":", 1)
            if state == "0A" and int(p, 16) == port:  # 0A: LISTEN
                found.add(addr)
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's socket table")
def test_bound_to_localhost_only(server):
    port = int(server[0].rsplit(":", 1)[1].strip("/"))
    addrs = listening_addresses(port)
    assert addrs == {"0100007F"}  # 127.0.0.1 only: not 0.0.0.0 (00000000) nor any other interface


def start_learning(page, name: str, steps: int) -> None:
    """Fill in the Learn tab's name and steps, then press Learn."""
    page.locator("#learn-name textarea").fill(name)
    box = page.locator("#learn-steps input[type=number]")
    box.fill(str(steps))
    box.press("Enter")
    page.click("#learn-button")


def test_learn_library_create(page, server, shots, astronaut_path):
    from playwright.sync_api import expect

    url, ids = server
    page.set_input_files("#learn-photo input[type=file]", str(astronaut_path))
    expect(page.locator("#learn-detect-msg")).to_contain_text("Found one face", timeout=60_000)
    expect(page.locator("#learn-boxes img").first).to_be_visible()
    expect(page.locator("#learn-crop img").first).to_be_visible()
    start_learning(page, "alice", 12)
    expect(page.locator("#learn-status")).to_contain_text("Learned <alice>", timeout=180_000)
    page.screenshot(path=str(shots / "learn.png"), full_page=True)
    assert (ids / "alice.safetensors").exists() and (ids / "alice.thumb.png").exists()

    page.get_by_role("tab", name="Library").click()
    expect(page.locator("#library-table")).to_contain_text("<alice>", timeout=20_000)
    expect(page.locator("#library-gallery img").first).to_be_visible()
    page.screenshot(path=str(shots / "library.png"), full_page=True)

    page.get_by_role("tab", name="Create").click()
    page.locator("#create-chips label", has_text="<alice>").click()
    prompt = page.locator("#create-prompt textarea")
    expect(prompt).to_have_value("<alice> person", timeout=10_000)
    prompt.press("End")
    prompt.type(" at the beach")
    steps = page.locator("#create-steps input[type=number]")  # few denoising steps: the tiny model draws noise anyway
    steps.fill("4")
    steps.press("Enter")
    page.click("#create-button")
    expect(page.locator("#create-gallery img").first).to_be_visible(timeout=120_000)
    expect(page.locator("#create-msg")).to_contain_text("1 image(s)")  # GenerateConfig's num_images
    page.screenshot(path=str(shots / "create.png"), full_page=True)
    pngs = list((ids / "outputs").rglob("*.png"))
    assert len(pngs) == 1
    from PIL import Image

    assert Image.open(pngs[0]).text["prompt"] == "<alice> person at the beach"


def test_several_photos_of_one_person(page, server, shots, astronaut_path, mirrored_path):
    """Two photos of one person: both shown with their faces boxed, learned as one identity."""
    from playwright.sync_api import expect

    url, ids = server
    page.reload()
    page.wait_for_selector("#learn-photo")
    page.set_input_files("#learn-photo input[type=file]", [str(astronaut_path), str(mirrored_path)])
    msg = page.locator("#learn-detect-msg")
    expect(msg).to_contain_text("astronaut_mirrored.png: Found one face", timeout=60_000)
    expect(msg).to_contain_text("astronaut.png: Found one face")
    expect(msg).not_to_contain_text("does not look like")
    expect(page.locator("#learn-boxes img")).to_have_count(2)
    expect(page.locator("#learn-crop img")).to_have_count(2)
    page.locator("#learn-name textarea").fill("carol")
    if os.environ.get("CELEBBASIS_UPDATE_SCREENSHOTS"):  # the README's picture of the Learn tab
        page.locator("#learn-plot").scroll_into_view_if_needed()
        page.screenshot(path=str(DOCS / "webui-learn.png"), full_page=True)
    start_learning(page, "carol", 4)
    expect(page.locator("#learn-status")).to_contain_text("Learned <carol>", timeout=180_000)
    from celebbasis.identity import Identity

    photos = Identity.load(ids / "carol.safetensors").metadata["source_photos"]
    assert photos == ["astronaut.png", "astronaut_mirrored.png"]


def test_cancel_leaves_nothing(page, server, astronaut_path):
    from playwright.sync_api import expect

    url, ids = server
    page.reload()
    page.wait_for_selector("#learn-photo")
    page.get_by_role("tab", name="Learn").click()
    page.set_input_files("#learn-photo input[type=file]", str(astronaut_path))  # its own photo: runs alone too
    expect(page.locator("#learn-detect-msg")).to_contain_text("Found one face", timeout=60_000)
    start_learning(page, "bob", 1600)
    expect(page.locator("#learn-status")).to_contain_text("Learning: step", timeout=120_000)
    page.click("#learn-cancel")
    expect(page.locator("#learn-status")).to_contain_text("Cancelled; nothing was saved", timeout=60_000)
    assert not (ids / "bob.safetensors").exists()
    assert not list(ids.glob(".*.tmp"))


def test_bad_name_is_refused(page, server):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Learn").click()
    page.locator("#learn-name textarea").fill("../evil")
    page.click("#learn-button")
    expect(page.locator("#learn-status")).to_contain_text("Invalid name", timeout=60_000)
    assert not list(server[1].parent.rglob("evil*"))


def test_mix_and_delete(page, server):
    from playwright.sync_api import expect

    url, ids = server
    page.get_by_role("tab", name="Mix").click()
    page.locator("#mix-a input").click()
    page.get_by_role("option", name="alice").click()
    page.locator("#mix-celebrity textarea").fill("Anne Hathaway")
    page.locator("#mix-name textarea").fill("alianne")
    page.click("#mix-button")
    expect(page.locator("#mix-msg")).to_contain_text("Saved <alianne>", timeout=120_000)
    expect(page.locator("#mix-preview img")).to_be_visible()
    assert (ids / "alianne.safetensors").exists()

    page.get_by_role("tab", name="Library").click()
    page.locator("#library-name input").click()
    page.get_by_role("option", name="alianne").click()
    page.click("#library-delete")
    expect(page.locator("#library-msg")).to_contain_text("Tick the confirmation box")
    assert (ids / "alianne.safetensors").exists()
    page.locator("#library-confirm input").check()
    page.click("#library-delete")
    expect(page.locator("#library-msg")).to_contain_text("Deleted alianne", timeout=30_000)
    assert not (ids / "alianne.safetensors").exists()
