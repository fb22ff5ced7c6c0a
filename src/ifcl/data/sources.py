"""Where the paper benchmarks' raw files come from, and fetching them safely into ``data/raw/<source>/``.

A *source* is a set of remote files (URL, expected size, checksum) plus the layout they produce once extracted.
:func:`fetch_source` makes a source ready:

* already marked ready (``ifcl-source.json`` written by an earlier fetch) -> nothing to do;
* the expected layout already in place (the user copied the data by hand) -> accepted and marked;
* otherwise each file is downloaded to a ``.part`` file (resumed with an HTTP range request when the server allows
  it; see :func:`download`), then renamed to its place (``downloads/<file>`` by default) only once it is whole: no
  stall (``timeout`` seconds without data), within the deadline of the whole transfer, not shorter than announced
  (Content-Length, the total of a Content-Range, the registry's size), the connection not broken; then its size and
  checksum are verified, and an archive with no published checksum is read whole (:func:`check_archive`: every tar
  member to its end, ``testzip()`` of a zip, a gzip file decompressed to its end). A cut transfer keeps its
  ``.part`` for the next run to resume; a ``.part`` that fails a check is deleted (unless it came with no length at
  all, see :func:`download`). Archives are extracted into a temporary folder (refusing members that would escape
  it: absolute paths, ``..``, links, devices; and a member that would overwrite the marker), moved into place only
  when complete and deleted, their size and sha256 recorded in the marker. Files with no direct download
  (``manual``) must be placed by hand. The marker is written last, so nothing half-done looks ready.

Every error names the file or URL and says how to place the data by hand (compute nodes often have no internet).
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import http.client
import os
import re
import shutil
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from ..files import atomic_path, read_json, write_json
from .remote import RemoteFile, Source

MARKER = "ifcl-source.json"
CODA_PROMPT_SPLITS = ("https://raw.githubusercontent.com/GT-RIPL/CODA-Prompt/"
                      "6417d4f68754be68b697c7ca2323ee61e791e1a3/dataloaders/splits/")
DOMAINNET = "http://csr.bu.edu/ftp/visda/2019/multi-source/"


class FetchError(RuntimeError):
    """A source could not be made ready; the message says which file and what to do."""


SOURCES: dict[str, Source] = {s.name: s for s in (
    Source("cifar100",
           (RemoteFile("https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz", None,
                       "md5:03b5dce01913d631647c71ecec9e9cb8", extract=True),),
           ("cifar-100-binary/train.bin", "cifar-100-binary/test.bin", "cifar-100-binary/fine_label_names.txt"),
           "cifar-100-binary/{train.bin,test.bin,fine_label_names.txt} (the binary version of CIFAR-100, extracted; "
           "the python version would need unpickling)"),
    Source("imagenet-r",
           (RemoteFile("https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar", None,
                       "md5:a61312130a589d0ca1a8fca1f2bd3337", extract=True),),
           ("imagenet-r/n01443537", "imagenet-r/n12267677"),
           "imagenet-r/<wnid>/<image>.jpg (imagenet-r.tar extracted: 200 class folders)"),
    Source("coda-prompt-imagenet-r",
           (RemoteFile(CODA_PROMPT_SPLITS + "imagenet-r_train.yaml", 1137662,
                       "sha256:6bcaa14ca9359915ac3a44c48ae71388146385686eb15da79a37844421a0b845"),
            RemoteFile(CODA_PROMPT_SPLITS + "imagenet-r_test.yaml", 284216,
                       "sha256:57275ac242d68983a4f39ccb81ec34f48b1bd920b9cd79e6e8040d7c042db02a")),
           ("downloads/imagenet-r_train.yaml", "downloads/imagenet-r_test.yaml"),
           "downloads/imagenet-r_{train,test}.yaml (CODA-Prompt's fixed ImageNet-R split lists, 24,000 / 6,000 images)"),
    Source("domainnet",
           tuple(RemoteFile(DOMAINNET + path, None, None, extract=True) for path in (
               "groundtruth/clipart.zip", "infograph.zip", "groundtruth/painting.zip", "quickdraw.zip", "real.zip",
               "sketch.zip")),
           ("clipart", "infograph", "painting", "quickdraw", "real", "sketch"),
           "<domain>/<class>/<image>.jpg for the six DomainNet domains (cleaned version, extracted). "
           "No checksums are published for these archives: ifcl records the sha256 of what it downloaded"),
    Source("coda-prompt-domainnet",
           (RemoteFile(CODA_PROMPT_SPLITS + "domainnet_train.yaml", None,
                       "gitblob:bf86d2fb6a4cafaa8dc413bc25998e9ec9728809"),
            RemoteFile(CODA_PROMPT_SPLITS + "domainnet_test.yaml", None,
                       "gitblob:3c5407918567c97203c85b074ccc323ed4643a7e")),
           ("downloads/domainnet_train.yaml", "downloads/domainnet_test.yaml"),
           "downloads/domainnet_{train,test}.yaml (CODA-Prompt's DomainNet split lists, the ones InfLoRA uses)"),
)}


from .mtil import SOURCES as _MTIL_SOURCES  # noqa: E402  (the MTIL datasets' sources, defined with their readers)

from .captions import SOURCES as _CAPTION_SOURCES  # noqa: E402

SOURCES.update(_MTIL_SOURCES)
SOURCES.update(_CAPTION_SOURCES)


def source_dir(raw_root: str | Path, name: str) -> Path:
    return Path(raw_root) / name


def _manual_hint(source: Source, raw_root: Path) -> str:
    folder = source_dir(raw_root, source.name)
    files = "\n".join(f"  {f.url}  ->  {folder / f.target}" for f in source.files)
    return (f"To install it by hand, put these files where shown (they are verified and unpacked):\n{files}\n"
            f"or place the unpacked data so that {folder} holds: {source.note}")


def _digest_of(path: Path, kind: str) -> str:
    if kind == "gitblob":
        h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    else:
        h = hashlib.new(kind)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_file(path: Path, remote: RemoteFile, check=None) -> str:
    """Check size and checksum of a downloaded file, then its content with ``check(path)`` if given (see
    :func:`check_archive`); return its sha256 (recorded in the marker)."""
    size = path.stat().st_size
    if remote.size is not None and size != remote.size:
        raise FetchError(f"{path} has {size} bytes, expected {remote.size} (from {remote.url}): "
                         "the transfer was cut short or the file changed upstream")
    if remote.digest is not None:
        kind, expected = remote.digest.split(":", 1)
        actual = _digest_of(path, kind)
        if actual != expected.lower():
            raise FetchError(f"{path} (from {remote.url}) fails its {kind} check: {actual} != {expected}")
    if check is not None:
        check(path)
    return _digest_of(path, "sha256")


STALL_TIMEOUT = 60.0       # seconds without a byte before a transfer is given up
MIN_DEADLINE = 3600.0      # the default limit on a whole transfer: this long, or longer for a large file ...
MIN_RATE = 100_000         # ... so that it may arrive at this many bytes a second


def download(url: str, dest: Path, remote: RemoteFile, progress: bool = True, timeout: float = STALL_TIMEOUT,
             deadline: float | None = None, check=None) -> str:
    """Download ``url`` to ``dest`` through ``dest.part``, verify it (:func:`verify_file`, with ``check``), rename it
    to ``dest``; return its sha256.

    An existing ``.part`` is resumed with a range request. ``timeout``: seconds without data before the transfer is
    given up (a stall); ``deadline``: seconds for the whole transfer, by default max(1 h, the bytes still to come at
    100 kB/s, counting what arrived where the size is unknown), checked after each read, so a server that trickles
    a byte now and then cannot hold the job forever. Whatever arrived is written to the ``.part`` as it arrives.
    A stall, the deadline, a connection closed early, or a body shorter than announced (Content-Length, the total of
    a Content-Range, or ``remote.size``) raise :class:`FetchError` and keep the ``.part``, so a new run resumes it. A
    ``.part`` that fails verification is deleted, so a new run downloads the file again from the start; except when
    the server announced no length and closed the connection (a cut cannot be told from the end of the file): then
    it is kept and a new run asks for the rest; if none comes, the next failure deletes it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    arrived, unsure = 0, False  # bytes received now; whether the end of the body could have been a cut
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if not (e.code == 416 and have):  # 416: range past the end, the part file is already complete
            raise FetchError(f"downloading {url} failed: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        kept = f"; the {have:,} bytes already in {part} are kept and a new run resumes from them" if have else ""
        raise FetchError(f"could not connect to {url}: {getattr(e, 'reason', e)} (no network on this node?){kept}"
                         ) from e
    else:
        with response:
            arrived, unsure = _receive(response, url, part, have, remote.size, timeout, deadline,
                                       dest.name if progress else None)
    try:
        sha256 = verify_file(part, remote, check)
    except FetchError as e:
        if unsure and arrived:
            raise FetchError(f"{e}\n{url} came with no length, so the transfer may have been cut: {part} is kept "
                             "and a new run asks for the rest (delete it to download the file from the start)") from e
        part.unlink(missing_ok=True)  # a corrupt part must not be resumed next time
        raise FetchError(f"{e}\n{part} is deleted: a new run downloads {url} again from the start") from e
    os.replace(part, dest)
    return sha256


def _receive(response, url: str, part: Path, have: int, size: int | None, timeout: float, deadline: float | None,
             label: str | None) -> tuple[int, bool]:
    """Append ``response``'s body to ``part`` (which holds ``have`` bytes), each chunk written as it arrives; return
    the bytes received and whether the server announced no length (so that the end could be a cut)."""
    if response.status == 206:  # the rest of the file: "Content-Range: bytes <first>-<last>/<total or *>"
        span = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", "").strip())
        if span and int(span[1]) != have:
            part.unlink()
            raise FetchError(f"downloading {url} failed: asked for the bytes from {have:,}, the server sent them from "
                             f"{int(span[1]):,}; {part} is deleted and a new run downloads the file from the start")
        total = int(span[2]) if span and span[2] != "*" else None
    else:  # the whole file (a server that ignores the range request too): start again
        have, total = 0, None
    length = response.headers.get("Content-Length")
    if total is None and length is not None:
        total = have + int(length)
    unsure = total is None and size is None and not response.chunked
    total = total if total is not None else size
    done, start = have, time.monotonic()
    last = start

    def cut(verb: str, why: str) -> FetchError:
        of = f" of {total:,}" if total is not None else ""
        return FetchError(f"downloading {url} {verb} after {done:,} bytes{of} ({why}); the {done:,} bytes are kept in "
                          f"{part} and a new run resumes from them")

    with open(part, "ab" if have else "wb") as f:
        try:
            while chunk := response.read1(1 << 20):
                f.write(chunk)
                f.flush()
                done += len(chunk)
                now = time.monotonic()
                limit = deadline if deadline is not None else \
                    max(MIN_DEADLINE, (max(total or 0, done) - have) / MIN_RATE)
                if now - start > limit:
                    raise cut("stopped", f"still running after {now - start:,.1f} s, over the limit of {limit:,.1f} s "
                                         "for one transfer: the server sends too slowly")
                if label and now - last > 10:
                    share = f" of {total / 1e6:.0f} MB ({100 * done / total:.0f} %)" if total else ""
                    print(f"{label}: {done / 1e6:.0f} MB{share}", flush=True)
                    last = now
        except TimeoutError as e:
            raise cut("stalled", f"no data for {timeout:g} s") from e
        except (OSError, http.client.HTTPException) as e:
            raise cut("was cut", f"the connection broke: {e!r}") from e
    if total is not None and done < total:
        raise cut("stopped", "the server closed the connection early")
    return done - have, unsure


def check_archive(path: Path, gunzip: bool = False) -> None:
    """Read a whole archive as :func:`extract` would: every member of a tar (plain or compressed) to its end and up
    to its end-of-archive block, ``testzip()`` of a zip, a gzip file (``gunzip``) decompressed to its end. A cut or
    damaged one raises :class:`FetchError` naming it."""
    try:
        if gunzip:
            with gzip.open(path) as g:
                while g.read(1 << 20):
                    pass
        elif zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
            if bad is not None:
                raise FetchError(f"{path}: member {bad!r} fails its CRC check")
        else:
            with tarfile.open(path) as t:
                for m in t:
                    if m.isfile():
                        with t.extractfile(m) as f:
                            while f.read(1 << 20):
                                pass
                if t.fileobj.tell() < t.offset + tarfile.BLOCKSIZE:
                    raise tarfile.ReadError("it ends without the end-of-archive block")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError) as e:
        kind = "gzip file" if gunzip else "tar or zip archive"
        raise FetchError(f"{path} is not a complete {kind} (cut short or damaged): {e}") from e


def _check_member(name: str, target: Path) -> None:
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or not (target / p).resolve().is_relative_to(target.resolve()):
        raise FetchError(f"archive member {name!r} would be written outside {target}: refusing the archive")


def extract(archive: Path, target: Path) -> None:
    """Unpack a tar or zip archive into ``target`` (created empty), refusing members that could escape it."""
    target.mkdir(parents=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                for info in z.infolist():
                    _check_member(info.filename, target)
                    if (info.external_attr >> 16) & 0o170000 == 0o120000:
                        raise FetchError(f"{archive}: member {info.filename!r} is a symbolic link: refusing the archive")
                z.extractall(target)
            return
        with tarfile.open(archive) as t:
            for m in t.getmembers():
                _check_member(m.name, target)
                if not (m.isfile() or m.isdir()):
                    raise FetchError(f"{archive}: member {m.name!r} is a link or a device file: refusing the archive")
            t.extractall(target, filter="data")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error) as e:
        raise FetchError(f"{archive} is not a readable tar or zip archive: {e}") from e


def _unpack(archive: Path, folder: Path, strip: str) -> None:
    """Extract ``archive`` into a temporary folder, then move the contents of its ``strip`` subfolder (or of the
    whole archive) into ``folder``, replacing what has the same name; an archive that would place a file named
    like the marker there is refused."""
    tmp = folder / f".extract-{archive.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        extract(archive, tmp)
        root = tmp / strip
        if not root.is_dir():
            raise FetchError(f"{archive} has no folder {strip!r}: not the expected archive")
        if (root / MARKER).exists():
            raise FetchError(f"{archive}: member {str(PurePosixPath(strip, MARKER))!r} would overwrite ifcl's marker "
                             f"{folder / MARKER}: refusing the archive")
        for item in sorted(root.iterdir()):
            old = folder / item.name
            if old.is_dir():
                shutil.rmtree(old)
            elif old.exists():
                old.unlink()
            os.replace(item, old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def layout_present(source: Source, folder: Path) -> bool:
    return all((folder / rel).exists() for rel in source.layout)


def fetch_source(name: str, raw_root: str | Path = "data/raw", mirror: str | None = None,
                 timeout: float = STALL_TIMEOUT, deadline: float | None = None) -> Path:
    """Make ``data/raw/<name>/`` ready (see the module docstring) and return it.

    ``mirror``: a base URL that replaces ``scheme://`` of every URL (``https://host/path`` -> ``<mirror>/host/path``),
    for a lab's internal mirror or a local test server. ``timeout``, ``deadline``: per file, see :func:`download`."""
    source = SOURCES[name]
    raw_root = Path(raw_root)
    folder = source_dir(raw_root, name)
    marker = folder / MARKER
    if marker.exists():
        return folder
    if layout_present(source, folder):
        # files that are their own layout (split lists, not archives) are verified like downloads
        record, sizes = {}, {}
        for remote in source.files:
            dest = folder / remote.target
            if dest.is_file() and not (remote.extract or remote.gunzip):
                try:
                    record[remote.target], sizes[remote.target] = verify_file(dest, remote), dest.stat().st_size
                except FetchError as e:
                    raise FetchError(f"{name}: {e}\n{_manual_hint(source, raw_root)}") from e
        print(f"{name}: found the expected files in {folder} (placed by hand); "
              + (f"verified {', '.join(sorted(record))}" if record else "accepting them"))
        write_json(marker, {"source": name, "placed_by_hand": True,
                            "files": {n: {"sha256": h} for n, h in sorted(record.items())}, "sizes": sizes})
        return folder
    record, sizes = {}, {}
    for remote in source.files:
        dest = folder / remote.target
        url = remote.url if mirror is None else mirror.rstrip("/") + "/" + remote.url.split("://", 1)[1]
        placed = dest.exists()  # a file the user put there is verified, unpacked and kept
        # an archive with no published checksum is read whole before it counts as complete
        check = None if remote.digest is not None or not (remote.extract or remote.gunzip) else \
            functools.partial(check_archive, gunzip=remote.gunzip)
        try:
            if remote.manual and not placed:
                raise FetchError(f"{dest} must be placed by hand (from {remote.url}; it has no direct download)")
            if placed:
                try:
                    record[remote.target] = verify_file(dest, remote, check)
                except FetchError as e:
                    raise FetchError(f"{e}\n{dest} was there before this run and is left as it is: delete it and run "
                                     "again to download it anew, or replace it with a complete copy") from e
            else:
                record[remote.target] = download(url, dest, remote, timeout=timeout, deadline=deadline, check=check)
            sizes[remote.target] = dest.stat().st_size
            if remote.extract:
                _unpack(dest, folder, remote.strip)
                if remote.inner:
                    _unpack(folder / remote.inner, folder, "")
                    (folder / remote.inner).unlink()
            elif remote.gunzip:
                try:
                    with gzip.open(dest, "rb") as src, atomic_path(folder / dest.name.removesuffix(".gz")) as out:
                        shutil.copyfileobj(src, out)
                except (EOFError, zlib.error, gzip.BadGzipFile) as e:
                    raise FetchError(f"{dest} is not a complete gzip file: {e}") from e
        except (FetchError, OSError, EOFError) as e:
            raise FetchError(f"{name}: {e}\n{_manual_hint(source, raw_root)}") from e
        if (remote.extract or remote.gunzip) and not placed:
            dest.unlink()  # unpacked and its sha256 recorded: keeping it would only double the disk space
    if not layout_present(source, folder):
        missing = [rel for rel in source.layout if not (folder / rel).exists()]
        raise FetchError(f"{name}: after download, {folder} lacks {missing}\n{_manual_hint(source, raw_root)}")
    write_json(marker, {"source": name, "placed_by_hand": False,
                        "files": {n: {"sha256": h} for n, h in sorted(record.items())}, "sizes": sizes})
    return folder


def read_marker(folder: str | Path) -> dict:
    return read_json(Path(folder) / MARKER)
