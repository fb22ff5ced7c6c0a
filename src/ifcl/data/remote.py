"""What a raw source is: remote files (URL, expected size, checksum, how to unpack) and the layout they produce.

Kept apart from :mod:`ifcl.data.sources` (the registry and the fetching) so that dataset modules that define their
own sources, such as :mod:`ifcl.data.mtil`, can be imported in any order.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath


@dataclass(frozen=True)
class RemoteFile:
    url: str
    size: int | None          # bytes; None where no trustworthy figure is published
    digest: str | None        # "md5:<hex>", "sha256:<hex>" or "gitblob:<sha1 of the git blob>"; None: unknown
    extract: bool = False     # an archive to unpack into the source folder
    strip: str = ""           # extract: the archive folder whose contents go into the source folder
    inner: str = ""           # extract: an archive found inside (relative to the source folder), unpacked in turn
    gunzip: bool = False      # a single gzip-compressed file, decompressed into the source folder
    dest: str = ""            # where a plain file goes (relative to the source folder); default downloads/<name>
    manual: bool = False      # no direct download (e.g. Google Drive): the file must be placed by hand at `dest`

    @property
    def name(self) -> str:
        return PurePosixPath(self.url).name

    @property
    def target(self) -> str:
        return self.dest or f"downloads/{self.name}"


@dataclass(frozen=True)
class Source:
    name: str
    files: tuple[RemoteFile, ...]
    layout: tuple[str, ...]   # paths (relative to data/raw/<name>/) that must exist when the source is ready
    note: str = ""            # what a user placing the files by hand should know
