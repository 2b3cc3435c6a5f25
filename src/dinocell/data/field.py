"""The unit of data: one field of view (plate, well, site) with one image per channel."""

from __future__ import annotations

from dataclasses import dataclass, field

#: Channels that are not fluorescent stains; they never enter the "mean of fluorescent channels" view.
BRIGHTFIELD_NAMES = frozenset({"brightfield", "bf", "brightfield_1", "brightfield_2", "brightfield_3",
                               "brightfieldlow", "brightfieldhigh", "highzbf", "lowzbf"})


def is_fluorescent(channel: str) -> bool:
    """True for stain channels, False for brightfield/transmitted-light channels."""
    name = channel.lower().replace("-", "_")
    return not (name in BRIGHTFIELD_NAMES or name.startswith("brightfield") or name.endswith("bf"))


@dataclass
class FieldRecord:
    """One field: where each channel's image lives, plus metadata (Metadata_* columns).

    ``channels`` maps a channel name (``DNA``, ``AGP`` ...) to a local path or ``s3://`` URI.
    Synthetic fields have an empty mapping and carry their generator index in ``metadata``.
    """

    plate: str
    well: str
    site: int
    channels: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """A stable, unique id for the field."""
        return f"{self.plate}/{self.well}/{self.site}"
