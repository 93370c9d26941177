"""ui.py: AppTest runs the script in this process against checkpoints of tiny training runs; one test opens
`streamlit run ui.py` in headless Chromium (skipped, with the reason, where Debian's `chromium` is missing)."""
import base64
import contextlib
import fcntl
import io
import json
import os
import pathlib
import select
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest

import run_vae
import ui
from conftest import ROOT, make_image_folder, tiny_config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two 1-step runs on 16x16 images, an unconditional VAE and then a CVAE: <tmp>/best/*.pt, <tmp>/logs/*/last.pt."""
    tmp = tmp_path_factory.mktemp("ui_runs")
    images = make_image_folder(tmp / "images")
    for name, conditional in (("tiny_vae", False), ("tiny_cvae", True)):
        run_vae.train(tiny_config(tmp, images, run={"name": name}, model={"conditional": conditional},
                                  train={"epochs": 1, "batch_size": 32}))
    return tmp


def start_app(monkeypatch, best, logs, *args):
    # `streamlit run ui.py -- ARGS` makes sys.argv [ui.py, ARGS]; AppTest runs the script in this process
    monkeypatch.setattr(sys, "argv", ["ui.py", "--best-dir", str(best), "--logs-dir", str(logs), *args])
    return AppTest.from_file(str(ROOT / "ui.py"), default_timeout=60).run()


def assert_no_problems(at):
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def grid(at):
    return at.session_state["samples_grid"].copy()


def test_lists_checkpoints_newest_first_and_shows_the_model(runs, monkeypatch):
    at = start_app(monkeypatch, runs / "best", runs / "logs")
    assert_no_problems(at)
    picker = at.selectbox(key="checkpoint")
    assert picker.options[:4] == [picker.format_func(str(p)) for p in (
        runs / "logs/tiny_cvae/last.pt", runs / "best/tiny_cvae.pt", runs / "logs/tiny_vae/last.pt",
        runs / "best/tiny_vae.pt")]
    assert picker.options[0].startswith("tiny_cvae · last · epoch 1 · val −ELBO ")
    assert "CVAE, 3 classes" in picker.options[0]
    assert "· VAE ·" in picker.options[3]
    assert picker.value == str(runs / "logs/tiny_cvae/last.pt")  # the newest is open
    sidebar = " ".join(m.value for m in at.sidebar.markdown)
    assert "CVAE over 3 classes" in sidebar and all(c in sidebar for c in ("Golden", "Golden-Red", "Red"))
    assert "| validation −ELBO (nats) | " in sidebar and "| active latent units | " in sidebar
    assert "latent_dim: 8" in at.sidebar.code[0].value  # the training config
    # samples, reconstructions and interpolation each render an image with a download button
    assert len(at.image) == 3 and all(img.value[0].endswith(".png") for img in at.image)
    assert len(at.download_button) == 3
    assert grid(at).shape[0] == 3 * 18 + 2  # one row of 16px images (2px padding) per class


def test_class_picker_and_seed_decide_the_pixels(runs, monkeypatch):
    at = start_app(monkeypatch, runs / "best", runs / "logs", "--checkpoint", str(runs / "best/tiny_cvae.pt"))
    at.selectbox(key="sample_class").set_value(0).run()
    golden = grid(at)
    at.selectbox(key="sample_class").set_value(2).run()
    assert_no_problems(at)
    red = grid(at)
    assert red.shape == golden.shape and (red != golden).any()
    at.number_input(key="seed").set_value(1).run()
    assert (grid(at) != red).any()
    at.number_input(key="seed").set_value(0).run()
    assert np.array_equal(grid(at), red)
    at.selectbox(key="sample_class").set_value(0).run()
    assert np.array_equal(grid(at), golden)
    again = start_app(monkeypatch, runs / "best", runs / "logs", "--checkpoint", str(runs / "best/tiny_cvae.pt"))
    again.selectbox(key="sample_class").set_value(0).run()
    assert np.array_equal(grid(again), golden)  # a new session, the same seed: the same pixels


def test_temperature_zero_gives_the_decoded_mean_everywhere(runs, monkeypatch):
    at = start_app(monkeypatch, runs / "best", runs / "logs", "--checkpoint", str(runs / "best/tiny_vae.pt"))
    assert_no_problems(at)
    assert "sample_class" not in [s.key for s in at.selectbox]  # unconditional: no class picker
    assert any("samples from the prior (fitted at epoch" in c.value for c in at.caption)  # says which prior
    assert grid(at).shape == (8 * 18 + 2, 8 * 18 + 2, 3)  # 64 samples, 8x8
    at.slider(key="num_samples").set_value(4)
    at.slider(key="temperature").set_value(0.0).run()
    g = grid(at)
    tiles = [g[2 + r * 18: 18 + r * 18, 2 + c * 18: 18 + c * 18] for r in range(2) for c in range(2)]
    assert all(np.array_equal(t, tiles[0]) for t in tiles)  # every sample decodes the prior's mean


def test_a_checkpoint_is_read_once_per_modification_time(runs, monkeypatch, tmp_path):
    (tmp_path / "best").mkdir()
    copy = tmp_path / "best" / "copy.pt"
    shutil.copy(runs / "best/tiny_cvae.pt", copy)
    reads, real_load = [], run_vae.load_checkpoint

    def counted_load(path, *args, **kwargs):
        reads.append(path)
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(run_vae, "load_checkpoint", counted_load)  # ui.py imports it from run_vae on every run
    at = start_app(monkeypatch, tmp_path / "best", tmp_path / "logs")
    assert len(reads) == 2  # once for the picker's summary, once for the model
    for seed in (1, 2):
        at.number_input(key="seed").set_value(seed).run()
    assert len(reads) == 2
    os.utime(copy, ns=(time.time_ns(), time.time_ns() + 10**9))  # as if a run saved a new best model
    at.run()
    assert_no_problems(at)
    assert len(reads) == 4


def test_interpolation_modes_and_reconstructions(runs, monkeypatch):
    at = start_app(monkeypatch, runs / "best", runs / "logs", "--checkpoint", str(runs / "best/tiny_cvae.pt"))
    assert at.radio(key="interp_mode").options == ["Two seeds", "Two images", "Two classes, same z"]
    for mode in at.radio(key="interp_mode").options:
        at.radio(key="interp_mode").set_value(mode)
        at.slider(key="interp_steps").set_value(5).run()
        assert_no_problems(at)
        assert len(at.image) == 3
    assert any("7 validation images" in c.value for c in at.caption)  # 20% of 36 held out by training's split
    at.radio(key="interp_mode").set_value("Two images")
    at.text_input(key="data_folder").set_value(str(runs / "nowhere")).run()
    assert not at.exception and "does not exist" in at.warning[0].value
    assert "Choose a data folder" in at.info[0].value
    assert len(at.image) == 1  # the samples still render


def test_blending_classes_matches_decoding_class_indices(runs):
    model = run_vae.model_from_checkpoint(run_vae.load_checkpoint(runs / "best/tiny_cvae.pt"))
    z, y = torch.randn(3, model.latent_dim), torch.tensor([0, 2, 1])
    with torch.no_grad():
        assert torch.allclose(ui.decode(model, z, torch.eye(3)[y]), model.decode(z, y))
    # noise goes through the checkpoint's fitted prior, as in VAE.sample: a seed means the same image in every view
    assert not torch.equal(model.prior_scale_tril[0], torch.eye(model.latent_dim))
    eps = ui.prior_noise(1, model.latent_dim, seed=3)
    with torch.no_grad():
        sampled = model.sample(1, torch.tensor([2]), generator=torch.Generator().manual_seed(3))
        assert torch.allclose(ui.decode_noise(model, eps, torch.eye(3)[[2]]), sampled, atol=1e-6)
        assert not torch.allclose(model.prior_z(eps, torch.tensor([2])), eps, atol=1e-3)
    a, b = torch.randn(8), torch.randn(8)
    for spherical in (True, False):
        path = ui.interpolate(a, b, 5, spherical)
        assert path.shape == (5, 8) and torch.allclose(path[0], a) and torch.allclose(path[-1], b, atol=1e-6)


@pytest.mark.parametrize("content, message", [
    ("truncated", "is damaged or not a PyTorch file"),
    (b"definitely not a checkpoint", "bad.pt"),  # run_vae calls this "not plain data" today: see the UI notes
    ("plain_dict", "is not a run_vae.py checkpoint"),
    ("code", "holds objects that are not plain data (refused for safety)"),
    (None, "does not exist"),
])
def test_bad_checkpoint_is_an_error_and_the_app_keeps_working(runs, monkeypatch, tmp_path, content, message):
    bad, ran = tmp_path / "bad.pt", tmp_path / "code_ran"
    if content == "truncated":  # a copy cut short, as by a full disk
        good = (runs / "best/tiny_vae.pt").read_bytes()
        bad.write_bytes(good[:len(good) // 2])
    elif content == "plain_dict":
        torch.save({"weights": torch.zeros(2)}, bad)
    elif content == "code":  # loading this with weights_only=False would create `ran`
        torch.save(RunsCode(ran), bad)
    elif content is not None:
        bad.write_bytes(content)
    at = start_app(monkeypatch, runs / "best", runs / "logs", "--checkpoint", str(bad))
    assert not at.exception
    assert len(at.error) == 1 and message in at.error[0].value
    assert not ran.exists()
    at.selectbox(key="checkpoint").set_value(str(runs / "best/tiny_vae.pt")).run()  # pick a good one
    assert_no_problems(at)
    assert len(at.image) == 3


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_no_checkpoint_says_how_to_train(tmp_path, monkeypatch):
    at = start_app(monkeypatch, tmp_path / "best", tmp_path / "logs")
    assert_no_problems(at)
    assert "python run_vae.py --config config/train_demo.yaml" in at.info[0].value
    at.selectbox(key="checkpoint").set_value(ui.TYPED_PATH).run()
    at.text_input(key="typed_path").set_value(str(tmp_path / "typo.pt")).run()
    assert not at.exception and "does not exist" in at.error[0].value


def test_unknown_arguments_are_a_warning(runs, monkeypatch):
    at = start_app(monkeypatch, runs / "best", runs / "logs", "--chekpoint", "x.pt")
    assert not at.exception and "--chekpoint" in at.warning[0].value and len(at.image) == 3


def test_64_image_grid_at_64px_takes_well_under_a_second():
    model = run_vae.VAE(64, 128, 0).eval().to(memory_format=torch.channels_last)  # as ui.load_model leaves it
    times = []
    for _ in range(3):  # best of 3: the machine is shared
        start = time.perf_counter()
        images, nrow, labels = ui.prior_samples(model, ["a"], 64, 0, 1.0)
        ui.png_bytes(ui.scaled_for_display(run_vae.make_grid_image(images, nrow, labels)))
        times.append(time.perf_counter() - start)
    assert images.shape == (64, 3, 64, 64) and min(times) < 1.0, times

# ----------------------------------------------------------------------------------------------------
# real browser


class DevTools:
    """A headless Chromium driven over the DevTools protocol on --remote-debugging-pipe: no driver, no port.
    Messages are JSON ending in a NUL byte; the browser reads them from fd 3 and answers on fd 4."""

    def __init__(self, args):
        to_browser, self.send_fd = os.pipe()
        self.recv_fd, from_browser = os.pipe()
        # the browser's ends must not be fds 3 or 4 already, or dup2 onto them would not clear close-on-exec
        to_browser, from_browser = (self.above_4(fd) for fd in (to_browser, from_browser))

        def wire():  # in the child, before exec
            os.dup2(to_browser, 3)
            os.dup2(from_browser, 4)

        # close_fds=False so fds 3 and 4 survive; every other fd Python opens is close-on-exec anyway
        self.proc = subprocess.Popen([*args, "--remote-debugging-pipe"], preexec_fn=wire, close_fds=False,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self.buffer, self.last_id, self.events = b"", 0, []

    @staticmethod
    def above_4(fd):
        moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 5)
        os.close(fd)
        return moved

    def call(self, method, session=None, timeout=30, **params):
        self.last_id += 1
        message = {"id": self.last_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self.send_fd, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self.last_id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
                self.events.append(reply)
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.recv_fd], [], [], left)[0]:
                raise TimeoutError(f"Chromium did not answer {method} within {timeout}s")
            chunk = os.read(self.recv_fd, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium exited (code {self.proc.poll()}) during {method}")
            self.buffer += chunk

    def close(self):
        try:
            self.call("Browser.close", timeout=5)
            self.proc.wait(10)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        os.close(self.send_fd)
        os.close(self.recv_fd)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(url, server, log, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"streamlit exited with code {server.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                return
        time.sleep(0.2)
    pytest.fail(f"streamlit did not answer on {url} within {timeout}s:\n{log.read_text()[-3000:]}")


# what the page shows, read inside the browser: the images Streamlit serves from /media/ and any error box
PAGE_STATE = """(() => {
  const media = [...document.querySelectorAll('img')].filter(i => i.src.includes('/media/'));
  const loaded = media.filter(i => i.complete && i.naturalWidth > 0);
  return {media: media.length, loaded: loaded.length,
          visible: loaded.filter(i => i.getBoundingClientRect().width > 0).map(i => i.src),
          errors: document.querySelectorAll('[data-testid="stException"], [data-testid="stAlertContentError"]').length,
          running: !!document.querySelector('[data-testid="stStatusWidget"]'),
          text: document.body ? document.body.innerText : ''};
})()"""


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="Debian's chromium is not installed (apt-get install chromium); .ci/run installs it")
def test_browser_shows_the_generated_grid(runs, tmp_path):
    port, log = free_port(), tmp_path / "streamlit.log"
    url = f"http://127.0.0.1:{port}"
    checkpoint = runs / "best/tiny_cvae.pt"
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "ui.py", "--server.headless", "true",
         "--browser.gatherUsageStats", "false", "--server.address", "127.0.0.1", "--server.port", str(port),
         "--server.fileWatcherType", "none", "--", "--best-dir", str(runs / "best"), "--logs-dir",
         str(runs / "logs"), "--checkpoint", str(checkpoint)],
        cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
    browser = None
    try:
        wait_for_server(url, server, log)
        browser = DevTools([
            "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic",
            f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1000",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "about:blank"])
        target = browser.call("Target.createTarget", url="about:blank")["targetId"]
        tab = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        browser.call("Network.enable", session=tab)  # to see every request the page makes
        browser.call("Emulation.setDeviceMetricsOverride", session=tab, width=1400, height=1000,
                     deviceScaleFactor=1, mobile=False)
        browser.call("Page.navigate", session=tab, url=url)
        deadline, state = time.monotonic() + 60, {}
        while time.monotonic() < deadline:  # the gallery: all three grids loaded, the script finished
            state = browser.call("Runtime.evaluate", session=tab, expression=PAGE_STATE,
                                 returnByValue=True)["result"].get("value") or {}
            if state.get("loaded", 0) >= 3 and state["visible"] and not state["running"]:
                break
            time.sleep(0.25)
        else:
            pytest.fail(f"no gallery within 60s: {state}\n{log.read_text()[-3000:]}")
        shot = base64.b64decode(browser.call("Page.captureScreenshot", session=tab, format="png")["data"])
        (tmp_path / "ui.png").write_bytes(shot)
        print(f"screenshot: {tmp_path / 'ui.png'}")

        assert state["errors"] == 0 and "VAE explorer" in state["text"] and "tiny_cvae" in state["text"]
        # the visible image is exactly the grid of seed 0 for every class, as the app computes it
        shown = np.asarray(Image.open(io.BytesIO(urllib.request.urlopen(state["visible"][0], timeout=10).read())))
        model, meta = ui.load_model(str(checkpoint), ui.modification_time(checkpoint))
        expected = np.asarray(ui.scaled_for_display(run_vae.make_grid_image(
            *ui.prior_samples(model, meta["classes"], 8, 0, 1.0))))
        assert shown.shape == expected.shape
        assert np.abs(shown.astype(int) - expected).max() <= 1  # another process may round a float differently
        screenshot = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB"))
        assert screenshot.shape[:2] == (1000, 1400) and screenshot.std() > 10  # not a blank page
        # nothing leaves the machine: no usage statistics, fonts or icons from the internet
        requests = [e["params"]["request"]["url"] for e in browser.events
                    if e.get("method") == "Network.requestWillBeSent"]
        requests += [e["params"]["url"] for e in browser.events if e.get("method") == "Network.webSocketCreated"]
        outside = [u for u in requests if urllib.parse.urlsplit(u).scheme not in ("data", "blob")
                   and urllib.parse.urlsplit(u).hostname != "127.0.0.1"]
        assert requests and not outside, outside
    finally:
        if browser is not None:
            browser.close()
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
