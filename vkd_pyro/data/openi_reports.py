"""Read the OpenI (Indiana University) radiology report archive, `NLMCXR_reports.tgz`.

Each `ecgen-radiology/<n>.xml` holds one report: `uId id="CXR<n>"`, `AbstractText` sections
(COMPARISON, INDICATION, FINDINGS, IMPRESSION), `MeSH/major` and `MeSH/automatic` terms written as
`Head/qualifier/qualifier`, and the `parentImage` ids of its images (`<id>.png` in NLMCXR_png).
"""

from __future__ import annotations

import importlib.util
import os
import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from vkd_pyro.errors import DataError

REPORT_SECTIONS = ("COMPARISON", "INDICATION", "FINDINGS", "IMPRESSION")


@dataclass(frozen=True)
class MeshTerm:
    """One MeSH term of a report, `Head/qualifier/...`, e.g. `Opacity/lung/upper lobe/right`."""

    head: str
    qualifiers: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> "MeshTerm":
        parts = [p.strip() for p in text.split("/")]
        return cls(head=parts[0], qualifiers=tuple(p.lower() for p in parts[1:] if p))

    def __str__(self) -> str:
        return "/".join((self.head,) + self.qualifiers)


@dataclass(frozen=True)
class Report:
    """One OpenI report: its id (`CXR<n>`), its text sections, MeSH terms and image ids."""

    uid: str
    sections: dict
    major: tuple[MeshTerm, ...]
    automatic: tuple[str, ...]
    image_ids: tuple[str, ...]

    def text(self, include_indication: bool = False) -> str:
        """The report text the guide reads: FINDINGS + IMPRESSION (INDICATION first if asked)."""
        names = (("INDICATION",) if include_indication else ()) + ("FINDINGS", "IMPRESSION")
        return " ".join(self.sections[n] for n in names if self.sections.get(n))

    @property
    def has_text(self) -> bool:
        """Whether the report has findings or an impression (28 OpenI reports have neither)."""
        return bool(self.sections.get("FINDINGS") or self.sections.get("IMPRESSION"))


def xrv_datapath() -> Path:
    """torchxrayvision's data folder (`torchxrayvision.datasets.datapath`), found without importing
    the package, which takes seconds."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("torchxrayvision is not installed: it ships the OpenI reports and view tables "
                        "(pip install torchxrayvision), or pass their paths")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def default_archive() -> Path:
    """The real OpenI report archive that the torchxrayvision package ships."""
    return xrv_datapath() / "NLMCXR_reports.tgz"


def parse_report_xml(data: bytes, name: str) -> Report:
    """Parse one report's XML; `name` (the archive member) is quoted in errors."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise DataError(f"{name}: malformed report XML ({exc})") from None
    uid_node = root.find("uId")
    if uid_node is None or not uid_node.get("id"):
        raise DataError(f"{name}: report has no <uId id=...>")
    sections = {}
    for node in root.iter("AbstractText"):
        label = (node.get("Label") or "").upper()
        if label in REPORT_SECTIONS:
            sections[label] = " ".join("".join(node.itertext()).split())
    mesh = root.find("MeSH")
    major = tuple(MeshTerm.parse(n.text) for n in (mesh.findall("major") if mesh is not None else []) if n.text)
    automatic = tuple(n.text.strip() for n in (mesh.findall("automatic") if mesh is not None else []) if n.text)
    image_ids = tuple(n.get("id") for n in root.findall("parentImage") if n.get("id"))
    return Report(uid=uid_node.get("id"), sections=sections, major=major, automatic=automatic, image_ids=image_ids)


def _report_number(member_name: str) -> int:
    stem = os.path.splitext(os.path.basename(member_name))[0]
    return int(stem) if stem.isdigit() else 1 << 62


def read_reports(archive: str | os.PathLike | None = None,
                 on_bad: Optional[Callable[[str, str, str], None]] = None) -> list[Report]:
    """All reports of an OpenI archive (`.tgz`) or folder of `<n>.xml`, in report-number order.

    A report whose XML cannot be parsed raises DataError; with `on_bad`, it calls
    `on_bad(member name, "malformed report XML", what is wrong)` instead and is left out.
    """
    path = Path(archive) if archive is not None else default_archive()

    seen = []

    def parse(data: bytes, name: str) -> None:
        seen.append(name)
        try:
            reports.append(parse_report_xml(data, name))
        except DataError as exc:
            if on_bad is None:
                raise
            on_bad(name, "malformed report XML", str(exc).removeprefix(f"{name}: "))

    if not path.exists():
        raise DataError(
            f"{path}: OpenI report archive not found (expected NLMCXR_reports.tgz or a folder of "
            "ecgen-radiology/<n>.xml; it ships with the torchxrayvision package and with OpenI)"
        )
    reports = []
    if path.is_dir():
        files = sorted(path.rglob("*.xml"), key=lambda p: _report_number(p.name))
        for file in files:
            parse(file.read_bytes(), str(file))
    else:
        try:
            with tarfile.open(path, "r:*") as tar:
                members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".xml")),
                                 key=lambda m: _report_number(m.name))
                for member in members:
                    parse(tar.extractfile(member).read(), f"{path}:{member.name}")
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise DataError(f"{path}: cannot read the report archive ({exc})") from None
    if not seen:
        raise DataError(f"{path}: no report XML files found")
    return reports
