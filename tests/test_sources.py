"""Fetching raw sources from a local HTTP server (127.0.0.1) that serves small fabricated archives at the real URLs'
paths (through the `mirror` setting), and building the benchmark manifests from them."""
import dataclasses
import gzip
import json
import hashlib
import io
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from ifcl.data import sources
from ifcl.data.benchmarks import cifar100_manifests, domainnet_manifests, imagenet_r_manifests
from ifcl.data.manifest import DatasetError
from ifcl.data.sources import MARKER, FetchError, RemoteFile, Source, fetch_source
from ifcl.files import read_json


class Server:
    """Serves ``files`` (URL path -> bytes) with Range support; ``truncate`` paths send half their bytes; ``custom``
    paths answer with their function ``f(handler, body, start)`` instead (a misbehaving server), which may wait on
    ``release`` (set when the test ends)."""

    def __init__(self):
        self.files, self.truncate, self.requests, self.custom, self.starts = {}, set(), [], {}, []
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
                server.starts.append(start)
                if self.path in server.custom:
                    server.custom[self.path](self, body, start)
                    return
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                payload = body[start:]
                self.wfile.write(payload[: len(payload) // 2] if self.path in server.truncate else payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        # shutdown() waits for the loop's next poll: a short interval keeps each test's teardown short
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()

    def serve(self, public_url: str, body: bytes) -> str:
        path = "/" + public_url.split("://", 1)[1]
        self.files[path] = body
        return path


@pytest.fixture
def server():
    s = Server()
    yield s
    s.release.set()
    s.httpd.shutdown()


def tar_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def safetensors_bytes(n: int = 4) -> bytes:
    """A safetensors file holding one uint8 tensor of ``n`` values."""
    header = json.dumps({"x": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
    return len(header).to_bytes(8, "little") + header + bytes(i % 256 for i in range(n))


def fake_cifar(n_classes=3, per_class=2, seed=0) -> tuple[bytes, dict]:
    """A CIFAR-100 binary-version archive: records of (coarse label, fine label, 3072 pixel bytes)."""
    rng = np.random.default_rng(seed)
    batches, members = {}, {}
    for part in ("train", "test"):
        labels = [c for c in range(n_classes) for _ in range(per_class)]
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        batches[part] = {"data": data, "fine_labels": labels}
        records = np.concatenate([np.zeros((len(labels), 1), np.uint8), np.array(labels, np.uint8)[:, None], data], 1)
        members[f"cifar-100-binary/{part}.bin"] = records.tobytes()
    members["cifar-100-binary/fine_label_names.txt"] = "".join(f"class{c}\n" for c in range(n_classes)).encode()
    return tar_bytes(members), batches


def with_source(monkeypatch, name: str, body: bytes, digest_of=None) -> RemoteFile:
    """Point the registry's source at fabricated bytes (same URL, their size and md5)."""
    real = sources.SOURCES[name]
    remote = dataclasses.replace(real.files[0], size=len(body),
                                 digest="md5:" + hashlib.md5(digest_of if digest_of is not None else body).hexdigest())
    monkeypatch.setitem(sources.SOURCES, name, dataclasses.replace(real, files=(remote,)))
    return remote


def test_download_verify_extract_then_manifests_and_no_second_download(server, monkeypatch, tmp_path):
    archive, batches = fake_cifar()
    remote = with_source(monkeypatch, "cifar100", archive)
    server.serve(remote.url, archive)
    folder = fetch_source("cifar100", tmp_path / "raw", mirror=server.url)
    assert (folder / MARKER).is_file() and (folder / "cifar-100-binary" / "train.bin").is_file()
    assert not (folder / "downloads" / remote.name).exists()  # extracted and recorded, not kept twice
    parts = cifar100_manifests(folder, tmp_path / "images")
    assert len(parts["train"]) == 6 and sorted({r[2] for r in parts["test"]}) == ["class0", "class1", "class2"]
    path, label, name = parts["train"][0]
    index = int(Path(path).stem)
    pixels = batches["train"]["data"][index].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(np.asarray(Image.open(path)), pixels) and label == batches["train"]["fine_labels"][index]
    n = len(server.requests)
    fetch_source("cifar100", tmp_path / "raw", mirror=server.url)
    assert len(server.requests) == n


def expect_clean_failure(tmp_path, mirror, name, match):
    with pytest.raises(FetchError, match=match) as info:
        fetch_source(name, tmp_path / "raw", mirror=mirror)
    folder = tmp_path / "raw" / name
    assert not (folder / MARKER).exists()
    assert not (folder / "cifar-100-binary").exists()
    assert not any(p.name.startswith(".extract") for p in folder.glob("*"))
    assert "by hand" in str(info.value)
    return str(info.value)


def test_wrong_checksum_404_and_escaping_archive_fail_cleanly(server, monkeypatch, tmp_path):
    archive, _ = fake_cifar()
    remote = with_source(monkeypatch, "cifar100", archive, digest_of=b"something else")
    server.serve(remote.url, archive)
    message = expect_clean_failure(tmp_path, server.url, "cifar100", "md5 check")
    assert remote.url.split("://")[1] in message
    assert not list((tmp_path / "raw" / "cifar100" / "downloads").glob("*"))  # a corrupt file is not kept to resume

    with_source(monkeypatch, "cifar100", archive)
    server.files.clear()
    message = expect_clean_failure(tmp_path, server.url, "cifar100", "HTTP 404")
    assert server.url + "/" + remote.url.split("://")[1] in message

    evil = tar_bytes({"cifar-100-binary/train.bin": b"x", "../escaped": b"x"})
    with_source(monkeypatch, "cifar100", evil)
    server.serve(remote.url, evil)
    expect_clean_failure(tmp_path, server.url, "cifar100", "outside")
    assert not (tmp_path / "raw" / "escaped").exists()


def test_a_cut_transfer_fails_then_resumes(server, monkeypatch, tmp_path):
    archive, _ = fake_cifar(n_classes=20, per_class=5)
    remote = with_source(monkeypatch, "cifar100", archive)
    server.serve(remote.url, archive)
    server.truncate.add("/" + remote.url.split("://", 1)[1])
    expect_clean_failure(tmp_path, server.url, "cifar100",
                         f"stopped after {len(archive) // 2:,} bytes of {len(archive):,} .the server closed")
    part = tmp_path / "raw" / "cifar100" / "downloads" / (remote.name + ".part")
    assert part.stat().st_size == len(archive) // 2
    server.truncate.clear()
    fetch_source("cifar100", tmp_path / "raw", mirror=server.url)
    assert (tmp_path / "raw" / "cifar100" / MARKER).exists() and not part.exists()


def test_resume_from_a_part_file(server, monkeypatch, tmp_path):
    archive, _ = fake_cifar(n_classes=20, per_class=5)
    remote = with_source(monkeypatch, "cifar100", archive)
    server.serve(remote.url, archive)
    part = tmp_path / "raw" / "cifar100" / "downloads" / (remote.name + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(archive[:1000])
    fetch_source("cifar100", tmp_path / "raw", mirror=server.url)
    assert (tmp_path / "raw" / "cifar100" / MARKER).exists() and not part.exists()


# --- servers that cut, stall or trickle ----------------------------------------------------------------------------

def close_early(handler, body, start):
    """HTTP/1.0 with no Content-Length: the body ends where the connection does, here after half of it."""
    handler.send_response(200)
    handler.end_headers()
    handler.wfile.write(body[: len(body) // 2])


def chunked_cut(handler, body, start):
    """One chunk announced for the whole body, the connection closed after half of it."""
    handler.send_response(200)
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    handler.wfile.write(b"%x\r\n" % len(body) + body[: len(body) // 2])


def short_range(handler, body, start):
    """A range answer that covers only half of what was asked for; its Content-Range says so (the total)."""
    end = start + (len(body) - start) // 2
    handler.send_response(206)
    handler.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(body)}")
    handler.send_header("Content-Length", str(end - start))
    handler.end_headers()
    handler.wfile.write(body[start:end])


def one_file_source(monkeypatch, url: str, layout: tuple[str, ...], **kw) -> RemoteFile:
    """Register source "test": one file with no published size or checksum (like DomainNet's archives)."""
    remote = RemoteFile(url, None, None, **kw)
    monkeypatch.setitem(sources.SOURCES, "test", Source("test", (remote,), layout, "the test's files"))
    return remote


@pytest.mark.parametrize("cut, match", [
    (close_early, r"(?s)data.tar.gz.part is not a complete tar or zip archive.*came with no length.*is kept"),
    (chunked_cut, r"was cut after {half:,} bytes \(the connection broke: IncompleteRead"),
], ids=["close", "chunked"])
def test_a_transfer_cut_without_a_length_is_kept_as_part_and_resumed(cut, match, server, monkeypatch, tmp_path):
    archive, _ = fake_cifar(n_classes=20, per_class=5)
    half = len(archive) // 2
    remote = one_file_source(monkeypatch, "https://example.org/data.tar.gz", ("cifar-100-binary/train.bin",),
                             extract=True)
    path = server.serve(remote.url, archive)
    server.custom[path] = cut
    with pytest.raises(FetchError, match=match.format(half=half)):
        fetch_source("test", tmp_path / "raw", mirror=server.url)
    folder = tmp_path / "raw" / "test"
    part = folder / "downloads" / "data.tar.gz.part"
    assert not (folder / remote.target).exists() and not (folder / MARKER).exists()
    assert part.read_bytes() == archive[:half]
    del server.custom[path]
    fetch_source("test", tmp_path / "raw", mirror=server.url)
    assert server.starts[-1] == half and not part.exists()  # resumed
    marker = sources.read_marker(folder)
    assert marker["files"] == {remote.target: {"sha256": hashlib.sha256(archive).hexdigest()}}
    assert marker["sizes"] == {remote.target: len(archive)}


def test_a_resumed_transfer_shorter_than_its_content_range_is_kept_as_part(server, monkeypatch, tmp_path):
    archive, _ = fake_cifar(n_classes=20, per_class=5)
    remote = one_file_source(monkeypatch, "https://example.org/data.tar.gz", ("cifar-100-binary/train.bin",),
                             extract=True)
    path = server.serve(remote.url, archive)
    server.custom[path] = short_range
    folder = tmp_path / "raw" / "test"
    part = folder / "downloads" / "data.tar.gz.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(archive[:1000])
    mid = 1000 + (len(archive) - 1000) // 2
    with pytest.raises(FetchError, match=f"stopped after {mid:,} bytes of {len(archive):,} .the server closed"):
        fetch_source("test", tmp_path / "raw", mirror=server.url)
    assert part.read_bytes() == archive[:mid] and not (folder / remote.target).exists()
    assert not (folder / MARKER).exists()
    del server.custom[path]
    fetch_source("test", tmp_path / "raw", mirror=server.url)
    assert server.starts[-1] == mid and (folder / MARKER).exists() and not part.exists()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


NOISE = np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("url, body, layout, kw", [
    ("https://example.org/data.tar.gz", tar_bytes({"d/a.bin": NOISE, "d/b.bin": NOISE[::-1]}), ("d/b.bin",),
     {"extract": True}),
    ("https://example.org/clipart.zip", zip_bytes({"clipart/a/1.jpg": NOISE, "clipart/a/2.jpg": NOISE[::-1]}),
     ("clipart/a/2.jpg",), {"extract": True}),
    ("https://example.org/labels.gz", gzip.compress(NOISE), ("labels",), {"gunzip": True}),
], ids=["tar.gz", "zip", "gz"])
def test_an_archive_without_checksum_is_read_whole_and_a_cut_one_deleted(url, body, layout, kw, server, monkeypatch,
                                                                          tmp_path):
    remote = one_file_source(monkeypatch, url, layout, **kw)
    cut = body[: len(body) * 2 // 3]
    server.serve(remote.url, cut)  # the server itself sends a cut file, with a Content-Length that matches it
    folder = tmp_path / "raw" / "test"
    dest = folder / remote.target
    part = dest.with_name(dest.name + ".part")
    with pytest.raises(FetchError, match="is not a complete") as info:
        fetch_source("test", tmp_path / "raw", mirror=server.url)
    assert f"{part} is not a complete" in str(info.value) and f"{part} is deleted" in str(info.value)
    assert not dest.exists() and not part.exists() and not (folder / MARKER).exists()

    dest.write_bytes(cut)  # a cut file that an earlier version renamed into place
    with pytest.raises(FetchError, match=f"{dest} was there before this run and is left as it is: delete it"):
        fetch_source("test", tmp_path / "raw", mirror=server.url)
    assert dest.read_bytes() == cut and not (folder / MARKER).exists()
    dest.unlink()

    server.serve(remote.url, body)
    fetch_source("test", tmp_path / "raw", mirror=server.url)
    marker = sources.read_marker(folder)
    assert marker["files"] == {remote.target: {"sha256": hashlib.sha256(body).hexdigest()}}
    assert marker["sizes"] == {remote.target: len(body)}


def test_an_archive_carrying_a_marker_is_refused(server, monkeypatch, tmp_path):
    archive = tar_bytes({"cifar-100-binary/train.bin": b"x", "cifar-100-binary/test.bin": b"x",
                         "cifar-100-binary/fine_label_names.txt": b"a\n", MARKER: b'{"source": "cifar100"}'})
    remote = with_source(monkeypatch, "cifar100", archive)
    server.serve(remote.url, archive)
    message = expect_clean_failure(tmp_path, server.url, "cifar100", "would overwrite ifcl's marker")
    assert f"{remote.name}: member {MARKER!r}" in message


def test_cut_weights_are_neither_kept_nor_recorded(server, tmp_path):
    from ifcl.files import write_json
    from ifcl.models.weights import check_weights, fetch_weights, weights_url

    spec = {"type": "timm", "name": "vit_tiny_patch16_224.augreg_in21k"}
    body = safetensors_bytes(10_000)
    path = server.serve(weights_url(spec), body[:6000])  # a cut file, with a Content-Length that matches it
    out = tmp_path / "weights" / "w.safetensors"
    record, part = out.with_name(out.name + ".json"), out.with_name(out.name + ".part")
    with pytest.raises(FetchError, match=f"{part} has 6,000 bytes, but its safetensors header describes {len(body):,}"
                       ) as info:
        fetch_weights(spec, out, mirror=server.url)
    assert f"{part} is deleted: a new run downloads {server.url}{path} again" in str(info.value)
    assert not out.exists() and not record.exists() and not part.exists()

    server.serve(weights_url(spec), body)
    server.custom[path] = close_early
    with pytest.raises(FetchError, match="came with no length") as info:
        fetch_weights(spec, out, mirror=server.url)
    assert part.read_bytes() == body[: len(body) // 2] and not out.exists() and not record.exists()
    del server.custom[path]
    assert fetch_weights(spec, out, mirror=server.url) == hashlib.sha256(body).hexdigest()
    assert server.starts[-1] == len(body) // 2

    out.write_bytes(body[:6000])  # cut weights an earlier version kept and recorded
    write_json(record, {"model": spec["name"], "url": None, "sha256": hashlib.sha256(body[:6000]).hexdigest()})
    with pytest.raises(FetchError, match=f"{out} has 6,000 bytes, but its safetensors header describes"):
        check_weights(out)
    with pytest.raises(FetchError, match="cut short or damaged\nDelete it"):
        fetch_weights(spec, out, mirror=server.url)


def test_a_stalled_transfer_keeps_what_arrived_and_says_so(server, tmp_path):
    def stall(handler, body, start):
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body[:12345])
        handler.wfile.flush()
        server.release.wait(10)

    remote = RemoteFile("https://example.org/big.bin", None, None)
    path = server.serve(remote.url, NOISE + NOISE)
    server.custom[path] = stall
    dest = tmp_path / "big.bin"
    part = dest.with_name("big.bin.part")
    with pytest.raises(FetchError) as info:
        sources.download(server.url + path, dest, remote, timeout=0.5)
    assert str(info.value) == (f"downloading {server.url}{path} stalled after 12,345 bytes of 100,000 (no data for "
                               f"0.5 s); the 12,345 bytes are kept in {part} and a new run resumes from them")
    assert part.read_bytes() == NOISE[:12345] and not dest.exists()

    with pytest.raises(FetchError, match=r"could not connect to http://127.0.0.1:9/x: .* \(no network on this node"):
        sources.download("http://127.0.0.1:9/x", tmp_path / "x", remote, timeout=0.5)


def test_a_trickling_transfer_meets_its_deadline(server, tmp_path):
    def trickle(handler, body, start):
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        for i in range(len(body)):
            if server.release.wait(0.2):
                return
            try:
                handler.wfile.write(body[i:i + 1])
            except OSError:  # the client gave up
                return

    remote = RemoteFile("https://example.org/slow.bin", None, None)
    path = server.serve(remote.url, NOISE[:1000])
    server.custom[path] = trickle
    began = time.monotonic()
    with pytest.raises(FetchError, match=r"stopped after \d bytes of 1,000 \(still running after 1\.\d s, over the "
                                         r"limit of 1\.0 s for one transfer"):
        sources.download(server.url + path, tmp_path / "slow.bin", remote, timeout=0.5, deadline=1.0)
    assert time.monotonic() - began < 3
    assert 3 <= (tmp_path / "slow.bin.part").stat().st_size <= 7


def test_data_placed_by_hand_is_accepted_offline(tmp_path):
    folder = tmp_path / "raw" / "cifar100" / "cifar-100-binary"
    folder.mkdir(parents=True)
    for f in ("train.bin", "test.bin", "fine_label_names.txt"):
        (folder / f).write_bytes(b"")
    fetch_source("cifar100", tmp_path / "raw", mirror="http://127.0.0.1:9")  # nothing listens there
    assert (tmp_path / "raw" / "cifar100" / MARKER).exists()


def test_split_lists_placed_by_hand_are_verified_like_downloads(tmp_path):
    folder = tmp_path / "raw" / "coda-prompt-imagenet-r" / "downloads"
    folder.mkdir(parents=True)
    for part in ("train", "test"):
        (folder / f"imagenet-r_{part}.yaml").write_text("data: []\ntargets: []\n")
    with pytest.raises(FetchError, match=r"imagenet-r_train.yaml has 21 bytes, expected 1137662"):
        fetch_source("coda-prompt-imagenet-r", tmp_path / "raw", mirror="http://127.0.0.1:9")
    assert not (tmp_path / "raw" / "coda-prompt-imagenet-r" / MARKER).exists()


def test_weights_placed_by_hand_are_recorded_then_checked_on_use(tmp_path):
    from ifcl.integrity import check_workdir
    from ifcl.models.weights import check_weights

    weights = tmp_path / "data" / "weights" / "vit_tiny_patch16_224.augreg_in21k.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(safetensors_bytes())
    report = check_workdir(tmp_path)
    assert report.recorded == ["data/weights/vit_tiny_patch16_224.augreg_in21k.safetensors"]
    assert "was placed by hand; its sha256 is recorded" in report.lines()[0]
    record = read_json(weights.with_name(weights.name + ".json"))
    assert record["placed_by_hand"] and record["sha256"] == hashlib.sha256(safetensors_bytes()).hexdigest()
    check_weights(weights)
    weights.write_bytes(b"replaced")
    with pytest.raises(FetchError, match="differs from the file recorded"):
        check_weights(weights)
    assert check_workdir(tmp_path).recorded == []


def test_malformed_cifar_records_are_refused(tmp_path):
    base = tmp_path / "cifar-100-binary"
    base.mkdir()
    (base / "fine_label_names.txt").write_text("a\nb\n")
    (base / "train.bin").write_bytes(bytes(3074 + 10))  # one record and a fragment
    with pytest.raises(DatasetError, match="not a whole number of 3074-byte CIFAR-100 records"):
        cifar100_manifests(tmp_path, tmp_path / "images")


def write_split_lists(folder: Path, prefix: str, entries: dict[str, list[tuple[str, int]]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for part, rows in entries.items():
        doc = {"data": [p for p, _ in rows], "targets": [t for _, t in rows]}
        (folder / f"{prefix}_{part}.yaml").write_text(yaml.safe_dump(doc))


def test_imagenet_r_coda_prompt_lists_and_official_random_split(tmp_path):
    raw = tmp_path / "raw" / "imagenet-r"
    files = [(w, f"{w}_{i}.jpg") for w in ("n01443537", "n01484850") for i in range(5)]
    for w, f in files:
        (raw / "imagenet-r" / w).mkdir(parents=True, exist_ok=True)
        (raw / "imagenet-r" / w / f).write_bytes(b"")
    lists = tmp_path / "lists"
    rows = [(f"data/imagenet-r/{w}/{f}", 0 if w == "n01443537" else 1) for w, f in files]
    write_split_lists(lists, "imagenet-r", {"train": rows[::2], "test": rows[1::2]})
    parts = imagenet_r_manifests(raw, {"rule": "coda-prompt"}, lists)
    assert len(parts["train"]) == 5 and parts["test"][0] == (str(raw / "imagenet-r/n01443537/n01443537_1.jpg"), 0, "n01443537")

    split = imagenet_r_manifests(raw, {"rule": "random", "seed": 0, "train_fraction": 0.8})
    import torch

    torch.manual_seed(0)  # the official code: random_split with the global generator right after seeding
    order = sorted(str(raw / "imagenet-r" / w / f) for w, f in files)
    train = sorted(order[i] for i in torch.randperm(10).tolist()[:8])
    assert [r[0] for r in split["train"]] == train and len(split["test"]) == 2
    assert all((raw / "imagenet-r" / w / f).exists() for w, f in files)  # nothing moved


def test_domainnet_lists_and_missing_images(tmp_path):
    raw = tmp_path / "domainnet"
    rows = [(f"data/DomainNet/{d}/{c}/{d}_{t:03d}_{i}.jpg", t) for d in ("clipart", "sketch")
            for t, c in enumerate(("aircraft_carrier", "airplane")) for i in range(2)]
    for p, _ in rows:
        (raw / Path(p).relative_to("data/DomainNet")).parent.mkdir(parents=True, exist_ok=True)
        (raw / Path(p).relative_to("data/DomainNet")).write_bytes(b"")
    write_split_lists(tmp_path / "lists", "domainnet", {"train": rows[:6], "test": rows[6:]})
    parts = domainnet_manifests(raw, tmp_path / "lists")
    assert {r[2] for r in parts["train"]} == {"aircraft_carrier", "airplane"} and len(parts["test"]) == 2
    (raw / Path(rows[0][0]).relative_to("data/DomainNet")).unlink()
    with pytest.raises(DatasetError, match="1 images listed in .*domainnet_train.yaml are missing"):
        domainnet_manifests(raw, tmp_path / "lists")


def test_timm_weights_fetched_recorded_and_loadable(server, tmp_path):
    import timm
    import torch
    from safetensors.torch import save_file

    from ifcl.models.vit_lora import load_backbone
    from ifcl.models.weights import fetch_weights, weights_url

    name = "vit_tiny_patch16_224.augreg_in21k"
    spec = {"type": "timm", "name": name}
    url = weights_url(spec)
    assert url == "https://huggingface.co/timm/vit_tiny_patch16_224.augreg_in21k/resolve/main/model.safetensors"
    state = {k: v.contiguous() for k, v in timm.create_model(name, pretrained=False).state_dict().items()}
    save_file(state, tmp_path / "served.safetensors")
    server.serve(url, (tmp_path / "served.safetensors").read_bytes())
    out = tmp_path / "weights" / f"{name}.safetensors"
    sha = fetch_weights(spec, out, mirror=server.url)
    assert sha == hashlib.sha256(out.read_bytes()).hexdigest()
    vit = load_backbone(spec, out)
    assert torch.equal(vit.pos_embed, state["pos_embed"])
    out.write_bytes(out.read_bytes()[:-1] + b"\0")  # the recorded file changed behind our back
    with pytest.raises(FetchError, match="differs from the file recorded"):
        fetch_weights(spec, out, mirror=server.url)


def test_open_clip_weights_url_fetch_and_load(server, tmp_path):
    """OpenAI's ViT-B/16 in open_clip's layout comes from the hub as safetensors; a tiny registered open_clip config
    stands in for it here: fetched through the mirror, recorded, then loaded by load_clip."""
    import json

    import open_clip
    import torch
    from safetensors.torch import save_file

    from ifcl.models.clip_prefix import load_clip
    from ifcl.models.weights import fetch_weights, weights_name, weights_url

    b16 = {"type": "open_clip", "name": "ViT-B-16", "pretrained": "openai"}
    assert weights_name(b16) == "ViT-B-16.openai"
    assert weights_url(b16) == ("https://huggingface.co/timm/vit_base_patch16_clip_224.openai/resolve/main/"
                                "open_clip_model.safetensors")
    with pytest.raises(FetchError, match="no Hugging Face hub weights"):
        weights_url({"type": "open_clip", "name": "ViT-B-16", "pretrained": "no-such-tag"})

    tiny = {"embed_dim": 16, "quick_gelu": True,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 16, "head_width": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    (tmp_path / "ifcl-test-tiny-clip.json").write_text(json.dumps(tiny))
    open_clip.add_model_config(tmp_path / "ifcl-test-tiny-clip.json")
    state = {k: v.contiguous() for k, v in open_clip.create_model("ifcl-test-tiny-clip").state_dict().items()}
    save_file(state, tmp_path / "served.safetensors")
    server.serve(weights_url(b16), (tmp_path / "served.safetensors").read_bytes())
    out = tmp_path / "weights" / f"{weights_name(b16)}.safetensors"
    sha = fetch_weights(b16, out, mirror=server.url)
    assert json.loads(out.with_name(out.name + ".json").read_text())["sha256"] == sha
    clip = load_clip({"type": "open_clip", "name": "ifcl-test-tiny-clip", "pretrained": "openai"}, str(out))
    assert torch.equal(clip.visual.positional_embedding, state["visual.positional_embedding"])
    assert not any(p.requires_grad for p in clip.parameters())


def test_mtil_coop_split_few_shot_and_80_20_split(tmp_path):
    from ifcl.data.mtil import mtil_manifests

    raw = tmp_path / "raw" / "mtil-dtd"
    split = {part: [[f"c{c}/{part}{i}.jpg", c, f"class_{c}"] for c in range(3) for i in range(n)]
             for part, n in (("train", 20), ("val", 6), ("test", 5))}
    raw.mkdir(parents=True)
    (raw / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))
    spec = {"type": "mtil", "name": "dtd", "split_seed": 0, "template": "a photo of a {} texture."}
    parts = mtil_manifests(spec, tmp_path / "raw", None)
    assert [len(parts[p]) for p in ("train", "val", "test")] == [60, 18, 15]
    assert parts["test"][0] == (str(raw / "images" / "c0" / "test0.jpg"), 0, "class_0")
    fs = mtil_manifests({**spec, "shots": 16}, tmp_path / "raw", None)
    assert [len(fs[p]) for p in ("train", "val", "test")] == [48, 12, 15]
    assert fs == mtil_manifests({**spec, "shots": 16}, tmp_path / "raw", None)  # drawn once, reproducibly

    from ifcl.data.mtil import _split_80_20

    rows = [(f"img{i}", i % 2, f"k{i % 2}") for i in range(20)]
    train, val = _split_80_20(rows, seed=3)
    assert len(train) == 16 and len(val) == 4 and not set(train) & set(val)
